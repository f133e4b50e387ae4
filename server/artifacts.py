"""Steering artifacts over HTTP: /v1/steering/vectors and /v1/steering/probes (list, get,
upload, delete).

Reads need the API key (when set); writes need the admin key (when set). Listings show
metadata only, never file-system paths.
"""

from __future__ import annotations

from dataclasses import asdict

import torch
from fastapi import APIRouter, Depends

from server.deps import StateDep, require_admin_key, require_api_key
from server.errors import ERROR_RESPONSES
from server.protocol import ProbeUpload, VectorUpload
from steering.artifacts import ArtifactError, ArtifactNotFound, check_name
from steering.errors import InvalidRequest, NotFound

router = APIRouter(prefix="/v1/steering", dependencies=[Depends(require_api_key)],
                   responses=ERROR_RESPONSES)


def _vector_record(meta) -> dict:
    return {"object": "steering.vector", "id": meta.name, **asdict(meta)}


def _name(name: str) -> str:
    try:
        return check_name(name)
    except ArtifactError as exc:
        raise InvalidRequest(str(exc), "name") from None


@router.get("/vectors")
async def list_vectors(state: StateDep):
    return {"object": "list", "data": [_vector_record(m) for m in state.engine.vectors.list()]}


@router.get("/vectors/{name}")
async def get_vector(name: str, state: StateDep, include_values: bool = False):
    try:
        values, meta = state.engine.vectors.get(_name(name))
    except ArtifactNotFound:
        raise NotFound(f"no steering vector named '{name}'", "name", "vector_not_found") from None
    record = _vector_record(meta)
    if include_values:
        record["values"] = values.tolist()
    return record


@router.post("/vectors", status_code=201, dependencies=[Depends(require_admin_key)])
async def upload_vector(body: VectorUpload, state: StateDep):
    try:
        meta = state.engine.vectors.put(
            _name(body.name), body.values, body.layer, method=body.method, source=body.source,
            description=body.description, model=body.model)
    except ArtifactError as exc:
        raise InvalidRequest(str(exc), exc.param) from None
    return _vector_record(meta)


@router.delete("/vectors/{name}", dependencies=[Depends(require_admin_key)])
async def delete_vector(name: str, state: StateDep):
    try:
        state.engine.vectors.delete(_name(name))
    except ArtifactNotFound:
        raise NotFound(f"no steering vector named '{name}'", "name", "vector_not_found") from None
    return {"object": "steering.vector.deleted", "id": name, "deleted": True}


def _probe_record(meta) -> dict:
    return {"object": "steering.probe", "id": meta.name, **asdict(meta)}


def _probe_not_found(name: str) -> NotFound:
    return NotFound(f"no probe named '{name}'", "name", "probe_not_found")


@router.get("/probes")
async def list_probes(state: StateDep):
    return {"object": "list", "data": [_probe_record(m) for m in state.engine.probes.list()]}


@router.get("/probes/{name}")
async def get_probe(name: str, state: StateDep, include_weights: bool = False):
    try:
        probe, meta = state.engine.probes.get(_name(name))
    except ArtifactNotFound:
        raise _probe_not_found(name) from None
    record = _probe_record(meta)
    if include_weights:
        record["weights"] = {k: v.tolist() for k, v in probe.tensors().items()}
    return record


@router.post("/probes", status_code=201, dependencies=[Depends(require_admin_key)])
async def upload_probe(body: ProbeUpload, state: StateDep):
    try:
        tensors = {k: torch.tensor(v, dtype=torch.float32) for k, v in body.weights.items()}
    except (ValueError, TypeError) as exc:  # ragged nested lists
        raise InvalidRequest(f"weights: {exc}", "weights") from None
    try:
        meta = state.engine.probes.put(
            _name(body.name), tensors, thresholds=body.thresholds.model_dump(),
            metrics=body.metrics, source=body.source, description=body.description,
            model=body.model, recipe=body.recipe)
    except ArtifactError as exc:
        raise InvalidRequest(str(exc), exc.param) from None
    return _probe_record(meta)


@router.delete("/probes/{name}", dependencies=[Depends(require_admin_key)])
async def delete_probe(name: str, state: StateDep):
    try:
        state.engine.probes.delete(_name(name))
    except ArtifactNotFound:
        raise _probe_not_found(name) from None
    return {"object": "steering.probe.deleted", "id": name, "deleted": True}
