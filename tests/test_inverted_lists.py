"""The memory bank's inverted-list search (detectors/memory/inverted_lists.py) on hand-made banks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import load_file, save_file

from moleflow_edge.backbones import build_backbone
from moleflow_edge.config import DetectorKind
from moleflow_edge.detectors.base import FitOptions, TrainingSet
from moleflow_edge.detectors.memory import inverted_lists as inverted_lists_module
from moleflow_edge.detectors.memory.bank import MemoryBank, MemoryScorer
from moleflow_edge.detectors.memory.inverted_lists import InvertedListScorer, inverted_lists, kmeans
from moleflow_edge.detectors.memory.kind import patch_vectors
from moleflow_edge.detectors.registry import build_model, kind_of
from moleflow_edge.export import onnx_graphs
from moleflow_edge.export.precision import to_fp16
from moleflow_edge.export.trt_compat import check_tensorrt_compat
from tests.conftest import TINY_CONFIG

DIM, GRID = 16, 4


def _clustered(count: int, seed: int) -> torch.Tensor:
    """Vectors around 40 fixed centres of uneven weight, as patch features gather around kinds of surface."""
    centres = 4.0 * torch.randn(40, DIM, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(seed + 1)
    owner = torch.multinomial(torch.linspace(1.0, 8.0, 40), count, replacement=True, generator=generator)
    return centres[owner] + torch.randn(count, DIM, generator=generator)


def _embedding(batch: int, seed: int) -> torch.Tensor:
    return _clustered(batch * GRID * GRID, seed).reshape(batch, GRID, GRID, DIM).permute(0, 3, 1, 2).contiguous()


def test_every_bank_row_is_in_one_list_and_padding_repeats_a_member_of_its_own_list() -> None:
    bank = _clustered(3000, 0)
    centroids, lists = inverted_lists(bank, list_size=50, seed=0)
    assert len(centroids) == len(lists) and lists.shape[1] <= 50  # long lists are cut at the size
    members = torch.cat([torch.unique(row) for row in lists])
    assert torch.equal(torch.sort(members).values, torch.arange(3000))  # each row once, in one list
    for row in lists:
        padding = row[len(torch.unique(row)) :]
        assert bool((padding == row[0]).all()), row  # pads with its own first row, never changing a minimum


def test_lists_are_deterministic_for_a_seed_and_differ_across_seeds() -> None:
    bank = _clustered(2000, 1)
    first, again = (inverted_lists(bank, 40, seed=3) for _ in range(2))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(kmeans(bank, 50, 3), kmeans(bank, 50, 4))


def test_probing_every_list_is_the_exact_search_and_probing_few_is_near_it() -> None:
    bank, position = _clustered(3000, 2), torch.randn(1, DIM, GRID, GRID)
    centroids, lists = inverted_lists(bank, 40, seed=0)
    embedding = _embedding(4, 3) + position
    exact, _ = MemoryScorer(bank, position)(embedding)
    everything, _ = InvertedListScorer(bank, centroids, lists, len(centroids), position)(embedding)
    torch.testing.assert_close(everything, exact, rtol=1e-5, atol=1e-5)
    few, _ = InvertedListScorer(bank, centroids, lists, 8, position)(embedding)
    assert bool((few >= exact - 1e-4).all())  # a subset of the bank: never nearer than the true nearest
    assert float(torch.isclose(few, exact, rtol=1e-5).float().mean()) >= 0.95


def test_the_list_graph_matches_torch_in_fp32_runs_in_fp16_and_passes_the_tensorrt_rules() -> None:
    bank, position = _clustered(3000, 4), torch.randn(1, DIM, GRID, GRID)
    centroids, lists = inverted_lists(bank, 40, seed=0)
    scorer = InvertedListScorer(bank, centroids, lists, 8, position).eval()
    proto = onnx_graphs.scorer_graph(scorer, DIM, GRID)
    ops = {n.op_type for n in proto.graph.node}
    assert {"TopK", "MatMul", "ReduceMin"} <= ops and ops & {"Gather", "GatherND"}, ops
    embedding = _embedding(3, 5) + position
    patch, image = scorer(embedding)
    for graph, tolerance in ((proto, 1e-5), (to_fp16(proto), 2e-2)):
        report = check_tensorrt_compat(graph)
        assert report.ok, report.problems
        session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
        got_patch, got_image = session.run(None, {"embedding": embedding.numpy()})
        scale = float(patch.max())
        # fp16 may pick another list on a near tie; most patches and the image scores stay close
        close = np.isclose(got_patch, patch.numpy(), rtol=tolerance, atol=tolerance * scale)
        assert close.mean() >= (1.0 if graph is proto else 0.95), close.mean()
        np.testing.assert_allclose(got_image, image.numpy(), rtol=tolerance)


def test_torch_searches_a_large_batch_a_few_images_at_a_time_with_the_same_scores(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bank, position = _clustered(3000, 6), torch.randn(1, DIM, GRID, GRID)
    centroids, lists = inverted_lists(bank, 40, seed=0)
    scorer = InvertedListScorer(bank, centroids, lists, 8, position)
    embedding = _embedding(5, 7) + position
    whole = scorer(embedding)  # small enough for one search
    calls: list[int] = []
    search = scorer._search
    monkeypatch.setattr(scorer, "_search", lambda images: calls.append(len(images)) or search(images))
    one_image = GRID * GRID * 8 * DIM * lists.shape[1] * 4  # the bytes one image's patches gather
    monkeypatch.setattr(inverted_lists_module, "GATHER_BYTES", 2 * one_image)
    chunked = scorer(embedding)
    assert calls == [2, 2, 1]  # never more than the budget at once
    for got, want in zip(chunked, whole, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_bank_without_lists_saves_as_before_and_one_with_lists_loads_its_shapes() -> None:
    exact = MemoryBank(DIM)
    exact.bank = _clustered(500, 6)
    assert list(exact.state_dict()) == ["bank"]  # the task file of an exact bank, as saved before lists
    reloaded = MemoryBank(DIM)
    reloaded.load_state_dict({"bank": exact.bank})
    assert not reloaded.searched_by_lists and torch.equal(reloaded.bank, exact.bank)
    listed = MemoryBank(DIM)
    listed.bank = exact.bank
    listed.centroids, listed.lists = inverted_lists(listed.bank, 30, seed=0)
    again = MemoryBank(DIM)
    again.load_state_dict(listed.state_dict())
    assert again.searched_by_lists and torch.equal(again.lists, listed.lists)
    assert torch.equal(again.centroids, listed.centroids)


def test_a_memory_task_with_a_bank_past_memory_lists_from_is_fitted_and_scored_by_its_lists() -> None:
    config = TINY_CONFIG.with_settings(
        "memory", coreset_min=50, coreset_max=400, memory_lists_from=300, memory_list_size=20
    )
    backbone = build_backbone(config, random_init=True)
    model, grid = build_model(config, backbone).eval(), config.grid_size
    for task, images in (("small", 2), ("large", 12)):
        model.add_task(task, kind_of(DetectorKind.MEMORY))
        concat = torch.randn(
            2, images, backbone.channels8 + backbone.channels16, grid, grid, generator=torch.Generator().manual_seed(7)
        )
        training = TrainingSet(concat, np.arange(images - 1), np.array([images - 1]))
        fitted = kind_of(DetectorKind.MEMORY).fit(
            model, task, training, FitOptions(1, torch.device("cpu"), None, False)
        )
        assert ("inverted lists" in fitted.summary) == (task == "large"), fitted.summary
    large, small = model.per_task["large"], model.per_task["small"]
    assert isinstance(large, MemoryBank) and isinstance(small, MemoryBank)
    assert len(large.bank) >= 300 and large.searched_by_lists and not small.searched_by_lists
    assert isinstance(kind_of(DetectorKind.MEMORY).scorer(model, "large"), InvertedListScorer)
    assert isinstance(kind_of(DetectorKind.MEMORY).scorer(model, "small"), MemoryScorer)


def test_a_product_with_more_candidates_than_the_old_cap_keeps_every_one_in_float16_lists(tmp_path: Path) -> None:
    config = TINY_CONFIG.with_settings("memory", memory_lists_from=3000, memory_list_size=64)
    grid, fitted = config.grid_size, []
    for _ in range(2):  # the same seed twice: the same bank and lists
        torch.manual_seed(0)
        model = build_model(config, build_backbone(config, random_init=True)).eval()
        model.add_task("big", kind_of(DetectorKind.MEMORY))
        channels = model.backbone.channels8 + model.backbone.channels16
        concat = torch.randn(2, 60, channels, grid, grid, generator=torch.Generator().manual_seed(1))
        training = TrainingSet(concat, np.arange(59), np.array([59]))  # 3840 patches; the old cap was 3000
        fit = kind_of(DetectorKind.MEMORY).fit(model, "big", training, FitOptions(1, torch.device("cpu"), None, False))
        assert fit.summary.startswith("kept 3840 of 3840 patch vectors of the images (all) and the 500 of 3840"), (
            fit.summary
        )
        fitted.append(model)
    bank = fitted[0].per_task["big"]
    assert isinstance(bank, MemoryBank) and bank.searched_by_lists
    assert bank.bank.dtype == torch.float16 and bank.lists.dtype == torch.int32
    with torch.no_grad():
        candidates = patch_vectors(fitted[0], concat.flatten(0, 1))
    assert len(bank.bank) == 4340 and torch.equal(bank.bank[:3840], candidates[:3840].half())  # every patch, in order
    again = fitted[1].per_task["big"]
    for name in ("bank", "centroids", "lists"):
        assert torch.equal(getattr(bank, name), getattr(again, name)), name
    save_file(bank.state_dict(), tmp_path / "big.safetensors")
    reloaded = MemoryBank(bank.bank.shape[1])
    reloaded.load_state_dict(load_file(tmp_path / "big.safetensors"))
    assert reloaded.bank.dtype == torch.float16 and reloaded.lists.dtype == torch.int32
    fitted[1].per_task["big"] = reloaded
    embedding = torch.randn(2, bank.bank.shape[1], config.grid_size, config.grid_size)
    scores = [kind_of(DetectorKind.MEMORY).scorer(m, "big")(embedding)[0] for m in fitted]
    assert torch.equal(scores[0], scores[1])  # a task file's bank scores exactly as the fitted one


def test_a_list_setting_below_one_is_refused_with_its_name() -> None:
    for name in ("memory_lists_from", "memory_list_size", "memory_probe"):
        with pytest.raises(ValueError, match=f"config field memory.{name} must be >= 1"):
            TINY_CONFIG.with_settings("memory", **{name: 0})
