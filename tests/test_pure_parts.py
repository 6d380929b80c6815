"""The pure parts on hand-made values, in the fast tier: the wire encoding of results (what serve
sends and run --server reads), the map_side request parameter, and the latency target's engine
choice. No model, no export, no server."""

from __future__ import annotations

import math

import numpy as np
import pytest

from moleflow_edge.contract import Precision
from moleflow_edge.preprocess import FrameError
from moleflow_edge.router import UNKNOWN
from moleflow_edge.runtime.engine_select import Candidate, choose
from moleflow_edge.runtime.result import FrameResult
from moleflow_edge.serving.protocol import MAP_SIDE_PARAMETER, decode_results, encode_results, map_side
from moleflow_edge.targets import target

TASKS = ["screw", "cap"]


def _results() -> list[FrameResult]:
    judged = FrameResult(
        0, "screw", {"screw": 1.5, "cap": 40.0}, 3.25, 3.0, True, np.arange(6, dtype=np.float32).reshape(2, 3)
    )
    judged.frame_shape = (20, 30, 3)
    judged.timings.backbone, judged.timings.detector = 4.5, 1.25
    unknown = FrameResult(1, UNKNOWN, {"screw": 90.0, "cap": 70.0}, frame_shape=(8, 8, 3), explained_by="cap")
    unknown.anomaly_map = np.full((4, 5), 0.5, np.float32)  # a larger map than the first: padded on the wire
    uncalibrated = FrameResult(2, "cap", {"screw": 50.0, "cap": 2.0}, 7.0, frame_shape=(8, 8, 3))
    bad = FrameResult(3, error="frame is empty (shape (0, 0, 3)), expected uint8 BGR HxWx3")
    return [judged, unknown, uncalibrated, bad]


def test_results_survive_the_wire_field_for_field() -> None:
    sent = _results()
    arrays = encode_results(sent, TASKS)
    assert arrays["anomaly_map"].shape == (4, 4, 5)  # every map padded to the largest
    back = decode_results(arrays, TASKS)
    assert [r.task for r in back] == ["screw", UNKNOWN, "cap", None]
    assert [r.is_anomaly for r in back] == [True, None, None, None]
    assert [r.image_score for r in back] == [3.25, None, 7.0, None]
    assert [r.threshold for r in back] == [3.0, None, None, None]
    assert [r.explained_by for r in back] == [None, "cap", None, None]
    assert back[3].error == sent[3].error and back[3].frame_shape is None
    assert back[0].distances == {"screw": 1.5, "cap": 40.0} and back[0].frame_shape == (20, 30, 3)
    assert (back[0].timings.backbone, back[0].timings.detector) == (4.5, 1.25)
    np.testing.assert_array_equal(back[0].anomaly_map, sent[0].anomaly_map)  # cropped back to its own shape
    np.testing.assert_array_equal(back[1].anomaly_map, sent[1].anomaly_map)
    assert back[2].anomaly_map is None


def test_a_distance_to_a_task_the_result_lacks_travels_as_nan() -> None:
    one = FrameResult(0, "screw", {"screw": 1.0}, 2.0, frame_shape=(8, 8, 3))
    arrays = encode_results([one], TASKS)
    assert math.isnan(arrays["distances"][0, 1])


@pytest.mark.parametrize(
    ("parameters", "expected"), [(None, 0), ({}, 0), ({MAP_SIDE_PARAMETER: 0}, 0), ({MAP_SIDE_PARAMETER: 300}, 300),
                                 ({MAP_SIDE_PARAMETER: 5000}, 1024)],
)  # fmt: skip
def test_map_side_is_the_request_s_whole_number_capped(parameters: dict | None, expected: int) -> None:
    assert map_side(parameters, 1024) == expected


@pytest.mark.parametrize("bad", ["big", -5, 1e9, 2.5, True])
def test_map_side_that_is_no_whole_number_is_a_frame_error(bad: object) -> None:
    with pytest.raises(FrameError, match=MAP_SIDE_PARAMETER):
        map_side({MAP_SIDE_PARAMETER: bad}, 1024)


def _candidates() -> list[Candidate]:
    cpu = target("onnxruntime-cpu")
    return [Candidate(cpu, Precision.FP32), Candidate(cpu, Precision.FP16), Candidate(cpu, Precision.INT8)]


def test_the_most_accurate_candidate_within_the_target_is_chosen() -> None:
    fp32, fp16, int8 = _candidates()
    ms = {fp32.key: 9.0, fp16.key: 5.0, int8.key: 3.0}
    accuracy = {Precision.FP32: 0.95, Precision.FP16: 0.96, Precision.INT8: 0.90}
    assert choose([fp32, fp16, int8], ms, accuracy, 10.0)[:2] == (fp16, True)  # fp16 measured more accurate
    assert choose([fp32, fp16, int8], ms, accuracy, 4.0)[:2] == (int8, True)  # the only one within 4 ms
    chosen, met, why = choose([fp32, fp16, int8], ms, accuracy, 1.0)
    assert (chosen, met) == (int8, False) and "fastest" in why


def test_without_recorded_accuracy_precision_ranks_the_candidates() -> None:
    fp32, fp16, int8 = _candidates()
    ms = {fp32.key: 9.0, fp16.key: 5.0, int8.key: 3.0}
    chosen, met, why = choose([fp32, fp16, int8], ms, dict.fromkeys(Precision), 10.0)
    assert (chosen, met) == (fp32, True) and "ranked by precision" in why
    recorded = {**dict.fromkeys(Precision), Precision.INT8: 0.9}  # a recorded figure beats none
    assert choose([fp32, fp16, int8], ms, recorded, 10.0)[0] == int8
