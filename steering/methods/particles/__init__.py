"""(Entropic) particle filtering over reasoning steps (Puri et al. 2025; ePF, arXiv
2510.05825): `steering.particles`. The server orchestrates the engine requests itself and
answers with the selected particle. Core: `core` (the filter, Entropic Annealing, look-ahead);
per request: `run`; rewards: `rewards`."""
