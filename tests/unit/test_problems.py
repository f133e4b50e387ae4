"""The problems (their instruction), the answer checker (which number of a reply is its answer),
and the results files the evaluations write whole or not at all."""

import pytest

from clients.experiments.problems import INSTRUCTIONS, extract_answer, generate, is_correct
from clients.files import write_text_atomic


@pytest.mark.parametrize("text, answer", [
    ("So the total is \\boxed{42}. Answer: 7", 42),  # the paper's format wins
    ("first \\boxed{3}, then \\boxed{1,200}", 1200),  # the last box
    ("<think>\\boxed{9}</think> Answer: 5", 5),  # thinking is not the answer
    ("<think>Answer: 9</think>", None),
    ("The answer is 12, I think 13", 12),
    ("I count 4, no, 6 apples", 6),
    ("no number here", None),
])
def test_the_answer_of_a_reply(text, answer):
    assert extract_answer(text) == answer


def test_is_correct_compares_the_extracted_number():
    assert is_correct("\\boxed{-3}", -3) and not is_correct("\\boxed{3}", -3)


def test_a_failed_write_leaves_the_old_file_and_no_leftover(tmp_path):
    """(`save_figure` writes through the same temporary file; matplotlib is a docs extra, not
    a test dependency.)"""
    write_text_atomic(tmp_path / "results.md", "old")
    with pytest.raises(UnicodeEncodeError):  # the file is open when the text fails to encode
        write_text_atomic(tmp_path / "results.md", "new \ud800")
    assert (tmp_path / "results.md").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["results.md"]


@pytest.mark.parametrize("text, score", [
    ("no work shown", 1 / 2),
    ("30 - 16 = 14\n14 + 20 = 34\nAnswer: 34", 3 / 4),
    ("30 - 16 + 20 = 34", 2 / 3),
    ("30 - 16 + 20 = 44", 1 / 3),
    ("35+27=62\n62 - 87 = -25\n", 3 / 4),
    ("35 + 27 = 62\n62 - 87 = 25\n", 2 / 4),
])
def test_the_arithmetic_process_reward_checks_each_written_sum(text, score):
    from clients.experiments.particles_eval import arithmetic_reward

    assert arithmetic_reward(text) == pytest.approx(score)


def test_the_instruction_follows_each_question_and_nothing_else_changes():
    plain = generate(20, seed=4)
    steps = generate(20, seed=4, instruction="steps")
    assert all(p.question.endswith(INSTRUCTIONS["answer"]) for p in plain)
    assert [s.question.removesuffix(INSTRUCTIONS["steps"]) for s in steps] == [
        p.question.removesuffix(INSTRUCTIONS["answer"]) for p in plain]
    assert [(s.answer, s.level, s.kind) for s in steps] == [
        (p.answer, p.level, p.kind) for p in plain]
