"""The steering methods, in order: the one list a method joins with one line.

The order is data, as in llama.cpp's sampler chain:
- their logits processors are registered with vLLM in this order (vLLM runs them within its
  two groups: those that can change the argmax on the raw logits, the others after its
  temperature and min-p, before its top-k / top-p);
- a gated row's chain applies the methods' truncation stages in this order (`STAGES`);
- each choice's report lists their sections in this order, and their per-step layer work runs
  in this order.
"""

from __future__ import annotations

from pydantic import Field, create_model

from steering.methods.base import Method, StrictModel
from steering.methods.deepconf.descriptor import DeepConf
from steering.methods.diffadapt.descriptor import DiffAdapt
from steering.methods.east.descriptor import East
from steering.methods.gates.descriptor import Dynatemp, Gates
from steering.methods.hidden_states.descriptor import HiddenStates
from steering.methods.mirostat.descriptor import Mirostat
from steering.methods.particles.descriptor import Particles
from steering.methods.top_nsigma.descriptor import TopNSigma
from steering.methods.typical.descriptor import Typical
from steering.methods.vreason.descriptor import VReason

METHODS: tuple[Method, ...] = (
    DiffAdapt(),
    DeepConf(),
    TopNSigma(),
    Typical(),
    Mirostat(),
    Dynatemp(),
    Gates(),
    East(),
    VReason(),
    Particles(),
    HiddenStates(),
)

BY_NAME = {m.name: m for m in METHODS}
STAGES = tuple(m.stage for m in METHODS if m.stage is not None)

SteeringOptions = create_model(
    "SteeringOptions", __base__=StrictModel,
    __doc__="Per-request steering methods and reporting.",
    return_entropy=(bool, Field(
        default=False, description="add per-token entropy and varentropy lists to the response")),
    **{name: spec for m in METHODS for name, spec in m.fields().items()})

REQUEST_FIELDS = {name: spec for m in METHODS for name, spec in m.request_fields().items()}
"""The methods' request-level aliases (e.g. `typical_p`), beside `steering`."""
