"""The global norm across ranks, tested for real: torchrun spawns 2 and 4 CPU processes
(gloo), each lays gradients out as FSDP2, HSDP, two meshes, tensor parallel, DDP,
pipeline stages or FSDP1 would, and clips them (tests/distributed_worker.py).
Every case is held against a single-process float64 reference: the norm to
1e-6, the clipped gradients to 1e-5, the same plain-tensor norm on every rank,
and at most one collective (none for DDP), never an all-gather."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
if not torch.distributed.is_available():  # pragma: no cover - a torch built without it
    pytest.skip("torch.distributed is not available", allow_module_level=True)

WORKER = Path(__file__).with_name("distributed_worker.py")
TWO_AND_FOUR = [
    "fsdp2_p2",
    "fsdp2_p1",
    "fsdp2_pinf",
    "fsdp2_fp16_beyond_65504",
    "fsdp2_x1e18",
    "two_meshes_and_plain",
    "tp_with_plain_params",
    "tp_all_dtensor",
    "pipeline_process_group",
    "pipeline_2d_mesh",
    "rank_without_gradients",
    "fsdp1_use_orig_params",
    "callback_with_dtensors",
]
FOUR_ONLY = ["hsdp_2x2", "pp2_x_fsdp2"]
pytestmark = pytest.mark.slow


def _run(world: int, out: Path, backend: str = "gloo") -> list[dict[str, Any]]:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={world}",
            str(WORKER),
            str(out),
            backend,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(world)]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> dict[int, list[dict[str, Any]]]:
    """Every rank's results, for world sizes 2 and 4 (one torchrun each)."""
    return {world: _run(world, tmp_path_factory.mktemp(f"world{world}")) for world in (2, 4)}


def _results(ranks: dict[int, list[dict[str, Any]]], world: int, case: str) -> list[dict[str, Any]]:
    results = [rank[case] for rank in ranks[world]]
    errors = [r["error"] for r in results if "error" in r]
    assert not errors, errors[0]
    return results


CASES = [(w, c) for w in (2, 4) for c in TWO_AND_FOUR] + [(4, c) for c in FOUR_ONLY]


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("layout", ["fsdp2", "pipeline"])
def test_adaptive_rules_over_ranks_equal_the_rule_on_the_full_gradients(
    ranks: dict[int, list[dict[str, Any]]], world: int, layout: str
) -> None:
    for result in _results(ranks, world, f"adaptive_rules_{layout}"):
        expected = {"zclip", "autoclip"} | ({"adagc"} if layout == "fsdp2" else set())
        assert set(result["worst"]) == expected
        for rule, error in result["worst"].items():
            assert error <= 1e-5, (rule, error)


@pytest.mark.parametrize("world", [2, 4])
def test_adagc_refuses_pipeline_stages_on_every_rank(
    ranks: dict[int, list[dict[str, Any]]], world: int
) -> None:
    for result in _results(ranks, world, "adagc_refuses_pipeline_stages"):
        assert "every rank to hold a part of every gradient tensor" in result["raised"]


@pytest.mark.parametrize("world", [2, 4])
def test_a_process_group_norm_is_over_that_group_only(
    ranks: dict[int, list[dict[str, Any]]], world: int
) -> None:
    results = _results(ranks, world, "subgroups")
    half = world // 2
    _check_global_and_cheap(results[:half])
    _check_global_and_cheap(results[half:])
    assert results[0]["ref"] != results[-1]["ref"]  # the halves hold different models


@pytest.mark.parametrize("world", [2, 4])
def test_adagc_with_a_rank_without_gradients_raises_on_every_rank(
    ranks: dict[int, list[dict[str, Any]]], world: int
) -> None:
    results = _results(ranks, world, "adagc_rank_without_gradients")
    assert all("between 0 and 6 tensors" in r["raised"] for r in results)


def test_a_clip_inside_ddp_no_sync_warns_and_the_right_place_does_not(
    ranks: dict[int, list[dict[str, Any]]],
) -> None:
    for result in _results(ranks, 2, "ddp_no_sync"):
        assert len(result["every micro-batch"]) == 1
        assert "inside no_sync()" in result["every micro-batch"][0]
        assert result["after the last"] == []


@pytest.mark.parametrize("world", [2, 4])
def test_clip_and_step_with_fsdp2_and_a_fused_adamw(
    ranks: dict[int, list[dict[str, Any]]], world: int
) -> None:
    for result in _results(ranks, world, "fsdp2_clip_and_step"):
        assert result["worst"] <= 1e-5
        assert sum(result["comms"].values()) <= 1, result["comms"]


@pytest.mark.parametrize(("world", "case"), CASES, ids=[f"{c}-world{w}" for w, c in CASES])
def test_the_norm_is_global_exact_and_costs_one_all_reduce(
    ranks: dict[int, list[dict[str, Any]]], world: int, case: str
) -> None:
    _check_global_and_cheap(_results(ranks, world, case))


def _check_global_and_cheap(results: list[dict[str, Any]]) -> None:
    first = results[0]
    assert {r["norm"] for r in results} == {first["norm"]}, "ranks disagree on the norm"
    assert all(r["plain"] for r in results), "the norm must be a plain tensor"
    assert abs(first["norm"] - first["ref"]) <= 1e-6 * first["ref"]
    for result in results:
        assert result["clipped_err"] <= 1e-5
        assert sum(result["comms"].values()) <= 1, result["comms"]
        assert not any("gather" in op for op in result["comms"]), result["comms"]


def test_ddp_bucket_views_need_no_collective(ranks: dict[int, list[dict[str, Any]]]) -> None:
    for world in (2, 4):
        results = _results(ranks, world, "ddp_bucket_view")
        assert all(r["comms"] == {} for r in results)
        assert all(abs(r["norm"] - r["ref"]) <= 1e-6 * r["ref"] for r in results)
        assert all(r["clipped_err"] <= 1e-5 for r in results)  # the buckets were scaled


def test_fsdp1_matches_fsdps_own_clip(ranks: dict[int, list[dict[str, Any]]]) -> None:
    for world in (2, 4):
        for result in _results(ranks, world, "fsdp1_use_orig_params"):
            assert abs(result["norm"] - result["fsdp1_norm"]) <= 1e-6 * result["fsdp1_norm"]
            assert result["vs_fsdp1_max_abs"] <= 1e-5


def test_a_nan_on_one_rank_raises_on_every_rank_and_changes_nothing(
    ranks: dict[int, list[dict[str, Any]]],
) -> None:
    for world in (2, 4):
        results = _results(ranks, world, "nan_on_one_rank")
        assert all("non-finite gradients in" in r["raised"] for r in results)
        assert all(r["untouched"] for r in results)
        assert "parameters[0]" in results[1]["raised"]  # the rank that holds it names it


def test_layouts_are_what_they_claim(ranks: dict[int, list[dict[str, Any]]]) -> None:
    assert _results(ranks, 4, "hsdp_2x2")[0]["placements"] == "(Replicate(), Shard(dim=0))"
    assert _results(ranks, 2, "tp_with_plain_params")[0]["kinds"] == ["DTensor", "Parameter"]
    assert _results(ranks, 2, "tp_all_dtensor")[0]["kinds"] == ["DTensor"]
    assert {r["owned"] for r in _results(ranks, 2, "rank_without_gradients")} == {0, 6}
    callback = _results(ranks, 2, "callback_with_dtensors")
    assert all(r["steps"] == 1 and r["clipped_steps"] == 1 for r in callback)


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2,
    reason="needs 2 CUDA devices (NCCL); runs where a GPU machine is lent",
)
def test_the_nccl_matrix_on_two_gpus(tmp_path: Path) -> None:
    results = _run(2, tmp_path, backend="nccl")
    for case in TWO_AND_FOUR:
        _check_global_and_cheap(_results({2: results}, 2, case))
    assert all(r["ddp_bucket_view"]["comms"] == {} for r in results)
