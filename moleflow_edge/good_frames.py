"""Good frames taken straight from a line's source (folder, video, camera:N, stream URL), for
`learn` and `calibrate --source`. Torch-free: `calibrate` runs on the line PC.

Frames are read through the run loop's own sources (runtime/sources.iter_source), so they
carry the camera's codec and light exactly as `run` will see them. A frame that cannot be read
is skipped and counted. A frame that repeats one already taken is refused: the rule is a mean
absolute difference below ``DUPLICATE_GREY_LEVELS`` grey levels (0-255) between the two frames'
32x32 grey thumbnails (INTER_AREA). Sensor noise averages out at that size, and distinct parts
of the synthetic products differ by 5 to 27 levels, a JPEG q90 round trip of one frame by 0.2:
so a stalled stream that repeats its last frame, or a line standing still under the camera,
adds nothing and is refused. A live source that keeps repeating is given up after
``MAX_READS_PER_FRAME`` reads per wanted frame, instead of waiting for ever.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import cv2
import numpy as np

from moleflow_edge.errors import InputError, UserError
from moleflow_edge.runtime.sources import SourceError, iter_source
from moleflow_edge.runtime.video_io import is_stream_url, redact

THUMBNAIL_SIDE = 32
DUPLICATE_GREY_LEVELS = 1.0
MAX_READS_PER_FRAME = 10


class FrameSourceError(UserError):
    """The source cannot be read, or holds too few distinct good frames; says how many it had."""


@dataclass
class GoodFrames:
    """The frames taken from a source, and what was passed over on the way."""

    source: str  # the source as given, with a stream URL's password redacted
    wanted: int
    frames: list[np.ndarray] = field(default_factory=list)  # BGR uint8, full size, as the source delivered them
    names: list[str] = field(default_factory=list)  # where each came from (file, video#index, camera:N#index)
    read: int = 0  # frames read from the source, taken or not
    unreadable: list[str] = field(default_factory=list)
    repeats: int = 0  # refused as a repeat of a frame already taken

    def progress(self) -> str:
        skipped = f"{len(self.unreadable)} unreadable, {self.repeats} repeats refused"
        return f"{len(self.frames)}/{self.wanted} frames ({skipped})"

    def record(self) -> dict[str, object]:
        """What the manifest's calibration record keeps about where its frames came from."""
        return {"frames_read": self.read, "frames_taken": len(self.frames), "frames_unreadable": len(self.unreadable),
                "frames_repeated": self.repeats}  # fmt: skip


def thumbnail(frame: np.ndarray) -> np.ndarray:
    """The 32x32 grey float32 thumbnail the repeat rule compares."""
    grey = frame if frame.ndim == 2 else cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
    return cv2.resize(grey, (THUMBNAIL_SIDE, THUMBNAIL_SIDE), interpolation=cv2.INTER_AREA).astype(np.float32)


def take_good_frames(
    source: str, wanted: int, at_least: int, progress: Callable[[GoodFrames], None] | None = None
) -> GoodFrames:
    """Up to ``wanted`` distinct readable frames of ``source``; a source that ends sooner is accepted
    with ``at_least`` frames or more, else refused (FrameSourceError, one line with the counts).
    ``progress`` hears about every frame taken."""
    if wanted < 1 or at_least > wanted:
        raise InputError(f"--frames must be >= {max(1, at_least)}, got {wanted}")
    label = redact(source) if is_stream_url(source.strip()) else source
    taken = GoodFrames(label, wanted)
    thumbnails = np.empty((0, THUMBNAIL_SIDE * THUMBNAIL_SIDE), np.float32)
    limit = MAX_READS_PER_FRAME * wanted
    try:
        for item in iter_source(source):
            taken.read += 1
            if item.frame is None:
                taken.unreadable.append(item.name)
            else:
                thumb = thumbnail(item.frame).ravel()
                if len(thumbnails) and np.abs(thumbnails - thumb).mean(axis=1).min() < DUPLICATE_GREY_LEVELS:
                    taken.repeats += 1
                else:
                    thumbnails = np.vstack([thumbnails, thumb])
                    taken.frames.append(item.frame)
                    taken.names.append(item.name)
                    if progress is not None:
                        progress(taken)
                    if len(taken.frames) == wanted:
                        break
            if taken.read >= limit:
                break
    except SourceError as exc:  # CameraLost included
        if len(taken.frames) < at_least:
            raise FrameSourceError(f"{exc} ({taken.progress()})") from None
    if len(taken.frames) < at_least:
        why = "gave up: a stalled stream, or a line standing still?" if taken.read >= limit else "the source ended"
        raise FrameSourceError(
            f"{label}: {taken.read} frames read, {taken.progress()}; need at least {at_least} distinct "
            f"good frames ({why})"
        )
    return taken
