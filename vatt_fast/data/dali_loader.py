"""DALI backend: clip plans executed by NVIDIA DALI pipelines (GPU decoding when CUDA is there).

The loader has the API of :class:`vatt_fast.data.pyav_loader.PyAVLoader` (see
``build_loader``) and executes the very same :class:`~vatt_fast.data.sampler.ClipPlan` s,
so both backends give the same clips for the same seed:

* a Python ``fn.external_source`` walks the shared :class:`ShardedSchedule`, draws each
  record's plan with the shared :class:`ClipSampler`, and feeds per sample: the encoded video
  file bytes, the plan's frame indices, the crop/flip as a resize region of interest, the audio
  bytes (see "Audio cost" below) and the audio start sample;
* ``fn.decoders.video`` decodes exactly those frames (``device="mixed"``: NVDEC, VP9/H.264/HEVC;
  ``device="cpu"``: libavcodec, VP8/VP9/MJPEG only);
* ``fn.resize`` with an absolute ROI does the short-side resize, the crop and the flip in one
  pass: crop ``(y, x, size)`` of the frame resized to ``plan.resized = (rh, rw)`` is the source
  region ``[y * h / rh, (y + size) * h / rh) x [x * w / rw, (x + size) * w / rw)`` resampled to
  ``size x size`` (linear with antialiasing, like swscale's bilinear); a flip swaps the ROI's x
  ends. Only the crop's pixels are computed;
* ``fn.decoders.audio`` decodes the FLAC, mixes down to mono and resamples to the model rate
  (windowed sinc); ``fn.slice`` cuts ``spec.audio_samples`` samples from
  ``round(audio_start * rate)``, zero padded past the end.

Outputs are copied out of DALI's buffers (which DALI reuses at the next iteration) into fresh
torch tensors with ``feed_ndarray``: device to device on the GPU, no host round trip.

Bad data: before a record is fed, :func:`~vatt_fast.data.pyav_loader.probe_media` (the PyAV
backend's probe, once per record, in ``num_workers`` threads for a batch's new records) checks
its headers: the video opens, has frames of the manifest's size on the constant fps grid and
enough of them for the window (DALI pads missing frames with black silently); the audio opens
with libsndfile (DALI's decoder), has a valid rate and channel count, holds the samples its
header declares and covers the window. A failing record is replaced by a record outside the
optimizer step (:func:`~vatt_fast.data.base.fill_batch`, as the PyAV backend does) and counted
under its kind; clips kept but padded count as ``short`` / ``no_captions``. Should DALI still
fail (corrupt packets inside a file), the records of the batches in flight are checked with the
PyAV reference decoder and, when it finds nothing, one by one through DALI itself; the broken
ones are marked, the pipeline is rebuilt and the batches are produced again.

Audio cost: DALI's audio decoder has no seek, so files longer than ``WHOLE_FILE_AUDIO_SECONDS``
(30 s; HowTo100M videos last minutes) are cut to the clip's window (plus a filter margin) with
libsndfile's FLAC seek in the feeding thread and handed to the same decoder as float WAV;
shorter files (the synthetic set, short clips) go whole.
"""

from __future__ import annotations

import math
import os
import weakref
from collections import deque
from typing import Any, Deque, Dict, Iterator, List, Optional, Sequence, Set, Tuple

import numpy as np
import torch

from vatt_fast.data.base import (
    ClipLoaderBase,
    Problem,
    TooMuchBadData,
    fill_batch,
    kept_problems,
    summarize_problems,
)
from vatt_fast.data.manifest import VideoRecord
from vatt_fast.data.options import LoaderOptions
from vatt_fast.data.pyav_loader import (
    MediaInfo,
    classify_error,
    decode_with_pyav,
    probe_media,
    window_problem,
)
from vatt_fast.data.sampler import ClipPlan, ClipSpec
from vatt_fast.data.vocab import Vocabulary

__all__ = ["DALILoader", "CPU_CODECS", "GPU_CODECS", "WHOLE_FILE_AUDIO_SECONDS", "build_clip_pipeline"]

# Codecs fn.decoders.video reads (DALI 2.4).
CPU_CODECS = ("vp8", "vp9", "mjpeg")
GPU_CODECS = ("vp8", "vp9", "mjpeg", "h264", "hevc", "av1", "mpeg4")
# Audio files longer than this are cut to the clip's window before DALI decodes them.
WHOLE_FILE_AUDIO_SECONDS = 30.0
# Extra audio on each side of a cut window: covers DALI's resampling filter (16 lobes at quality 50).
_AUDIO_MARGIN_SECONDS = 0.05


def build_clip_pipeline(source: Any, spec: ClipSpec, batch_size: int, *, gpu: bool, device_id: Optional[int],
                        num_threads: int, prefetch: int, seed: int, **pipeline_kw: Any):
    """The DALI pipeline that turns fed bytes + plan parameters into clips.

    ``source`` returns, per batch, six lists (one entry per sample): encoded video bytes
    (uint8 ``[N]``), frame indices (int32 ``[T]``), ROI start and end (float32 ``[2]``, (y, x)
    in source pixels), encoded audio bytes (uint8 ``[M]``) and the audio start sample
    (int32 ``[1]``).

    Returns:
        A built pipeline with outputs video uint8 ``[T, size, size, 3]`` and audio float32
        ``[audio_samples]`` per sample (on the GPU when ``gpu``). ``pipeline_kw`` go to
        ``pipeline_def`` (e.g. ``exec_pipelined=False``).
    """
    from nvidia.dali import fn, pipeline_def, types

    size = spec.frame_size

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                  prefetch_queue_depth=prefetch, seed=seed, **pipeline_kw)
    def clip_pipeline():
        video_bytes, frames, roi_start, roi_end, audio_bytes, audio_start = fn.external_source(
            source=source, num_outputs=6, batch=True)
        video = fn.decoders.video(video_bytes, frames=frames, device="mixed" if gpu else "cpu")
        video = fn.resize(video, roi_start=roi_start, roi_end=roi_end, roi_relative=False, size=[size, size],
                          interp_type=types.INTERP_LINEAR, antialias=True, dtype=types.UINT8)
        audio, _ = fn.decoders.audio(audio_bytes, downmix=True, sample_rate=float(spec.audio_sample_rate),
                                     dtype=types.FLOAT)
        audio = fn.slice(audio, audio_start, np.array([spec.audio_samples], np.int32), axes=[0],
                         normalized_anchor=False, normalized_shape=False, out_of_bounds_policy="pad")
        if gpu:
            audio = audio.gpu()
        return video, audio

    pipe = clip_pipeline()
    pipe.build()
    return pipe


# DALI pipelines own worker threads. A forked child (a DataLoader worker, say) inherits the
# Python objects but not the threads, so a pipeline freed there waits forever for threads that
# do not exist. After a fork, the child keeps every live loader's pipeline referenced here,
# never to be freed; its memory is the child's private copy, so nothing leaks in the parent.
_LIVE_LOADERS: "weakref.WeakSet[DALILoader]" = weakref.WeakSet()
_KEPT_AFTER_FORK: List[Any] = []


def _orphan_pipelines_in_child() -> None:
    for loader in list(_LIVE_LOADERS):
        _KEPT_AFTER_FORK.append((loader._pipe, loader._probe_pool))
        loader._pipe, loader._probe_pool = None, None


os.register_at_fork(after_in_child=_orphan_pipelines_in_child)


def _dali_error_summary(error: Exception) -> str:
    """The operator and the cause from a DALI pipeline error (which also holds a Python traceback)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    operator = next((line for line in lines if line.startswith("Error in")), "")
    cause = next((lines[i + 1] for i, line in enumerate(lines[:-1]) if line == "encountered:"), "")
    return " ".join(part for part in (operator, cause) if part) or (lines[0] if lines else repr(error))


class DALILoader(ClipLoaderBase):
    """Loader over a DALI pipeline (see ``build_loader`` for the API and batch contract).

    Takes :class:`~vatt_fast.data.base.ClipLoaderBase`'s arguments; the seed gives the same
    plans as PyAV. Of the options it uses ``num_workers`` (DALI CPU threads, at least one),
    ``prefetch_factor`` (batches DALI prepares ahead) and ``device``: ``"cuda[:i]"`` decodes
    with NVDEC on that GPU and returns CUDA tensors; ``"cpu"`` uses DALI's CPU decoder
    (VP8/VP9/MJPEG only); ``None``: the current CUDA device when CUDA is available, else the
    CPU. ``pin_memory`` is ignored (DALI manages its own staging buffers).
    """

    backend = "dali"

    def __init__(self, records: Sequence[VideoRecord], spec: ClipSpec, vocab: Vocabulary, options: LoaderOptions,
                 bad_data: Optional[Dict[str, int]] = None) -> None:
        if not records:
            raise ValueError("DALILoader needs at least one record; the split is empty")
        super().__init__(records, spec, vocab, options, bad_data)
        device = options.device
        if device == torch.device("cuda") or (device is None and torch.cuda.is_available()):
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.gpu = device is not None and device.type == "cuda"
        self.num_threads = max(1, options.num_workers)
        self._media: Dict[int, MediaInfo] = {}
        # Found by _recover: records DALI cannot decode (the PyAV reference can), rejected for every
        # clip; and records whose clip failed the PyAV reference, whose clips are checked with it
        # before they are fed. Both are part of the state, so a resumed run feeds the same clips.
        self._broken: Dict[int, Problem] = {}
        self._suspects: Set[int] = set()
        self._pipe: Any = None
        self._probe_pool: Any = None
        self._pending: Deque[Dict[str, Any]] = deque()
        _LIVE_LOADERS.add(self)

    def close(self) -> None:
        """Release the DALI pipeline (and its buffers) and the probing threads."""
        self._shutdown()
        if self._probe_pool is not None:
            self._probe_pool.shutdown(wait=True)
            self._probe_pool = None

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        self._shutdown()
        self._restart_eval_pass()
        return self._generate()

    # --- feeding -------------------------------------------------------------------
    def _check_codec(self, i: int, info: MediaInfo) -> None:
        """Raise when DALI cannot decode the record's codec here: a set-up error, not bad data."""
        allowed = GPU_CODECS if self.gpu else CPU_CODECS
        if info.kind is None and info.codec not in allowed:
            raise ValueError(
                f"{self.records[i].video} is {info.codec}, which DALI's "
                f"{'GPU' if self.gpu else 'CPU'} decoder cannot read (it reads {', '.join(allowed)}); "
                f"prepare the dataset with --codec vp9, run on a GPU, or use backend='pyav'"
            )

    def _probe_ahead(self, indices: np.ndarray) -> None:
        """Probe the batch's records not seen yet, in parallel (the first epoch's cost)."""
        todo = sorted({int(i) for i in indices} - set(self._media))
        if len(todo) < 2:
            return
        if self._probe_pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._probe_pool = ThreadPoolExecutor(self.num_threads, thread_name_prefix="dali-probe")
        fps = self.spec.fps

        def probe(j: int) -> Optional[MediaInfo]:
            try:
                return probe_media(self.records[j], fps)
            except Exception:  # probed again in _attempt, which counts the error
                return None

        for i, info in zip(todo, self._probe_pool.map(probe, todo)):
            if info is not None:
                self._media[i] = info

    def _attempt(self, epoch: int, i: int) -> Tuple[Any, Optional[Problem]]:
        """((plan, DALI inputs), None) for record ``i``, or (None, (kind, message))."""
        problem = self._broken.get(i)
        if problem is not None:
            return None, problem
        record = self.records[i]
        info = self._media.get(i)
        if info is None:
            try:
                info = self._media[i] = probe_media(record, self.spec.fps)
            except Exception as e:  # an unexpected failure: classify_error counts it under its type
                return None, classify_error(e, record)
        if info.kind is not None:
            return None, (info.kind, info.message)
        self._check_codec(i, info)
        try:
            plan = self.sampler.plan(record, i, epoch)
            problem = window_problem(plan, self.spec, info)
            if problem is not None:
                return None, problem
            if i in self._suspects:  # the PyAV reference failed on one of its clips: check this one first
                decode_with_pyav(plan, self.spec)
            inputs = self._inputs(plan, info)
        except Exception as e:  # any failure on one record is that record's problem; classify_error names it
            return None, classify_error(e, record)
        return (plan, inputs), None

    def _inputs(self, plan: ClipPlan, info: MediaInfo) -> Tuple[np.ndarray, ...]:
        """One sample's six external_source entries (see :func:`build_clip_pipeline`)."""
        h, w = self.sampler.frame_size_of(self.records[plan.index])
        rh, rw = plan.resized
        y, x, size = plan.crop
        sy, sx = h / rh, w / rw
        y0, y1 = y * sy, (y + size) * sy
        x0, x1 = x * sx, (x + size) * sx
        if plan.flip:
            x0, x1 = x1, x0
        encoded, first = self._audio_input(plan, info)
        return (
            np.fromfile(plan.video, dtype=np.uint8),
            np.asarray(plan.frame_indices, dtype=np.int32),
            np.array([y0, x0], dtype=np.float32),
            np.array([y1, x1], dtype=np.float32),
            encoded,
            np.array([first], dtype=np.int32),
        )

    def _feed(self, schedule_it: Iterator[Tuple[int, int, np.ndarray]]):
        """The external_source callback: the next batch's encoded bytes and plan parameters."""
        try:
            epoch, b, indices = next(schedule_it)
        except StopIteration:
            raise StopIteration from None
        self._probe_ahead(indices)
        results, problems = fill_batch(
            indices, lambda i: self._attempt(epoch, i), num_records=len(self.records),
            step_records=lambda: self.schedule.global_batch(epoch, b),
            rank=self.options.rank, world_size=self.options.world_size,
        )
        plans = [plan for plan, _ in results]
        for plan in plans:
            problems.extend(kept_problems(plan, self.spec))
        self._pending.append({"epoch": epoch, "batch": b, "plans": plans, "problems": problems})
        return tuple(list(column) for column in zip(*(inputs for _, inputs in results)))

    def _audio_input(self, plan: ClipPlan, info: MediaInfo) -> Tuple[np.ndarray, int]:
        """Encoded audio for DALI's decoder and the output sample where the clip starts in it.

        Short files go whole (the FLAC bytes). For files longer than
        :data:`WHOLE_FILE_AUDIO_SECONDS`, decoding the whole file per clip would bound the
        loader (HowTo100M videos last minutes), so the window plus a filter margin is cut with
        libsndfile's FLAC seek and handed over as float WAV (exact for any FLAC bit depth); DALI
        still decodes, downmixes and resamples it. The cut starts on a
        multiple of ``rate_in / gcd(rate_in, rate_out)`` input samples, so output samples fall on
        the same time grid as with the whole file.
        """
        import io

        import soundfile as sf

        sr_out = int(self.spec.audio_sample_rate)
        out0 = int(round(plan.audio_start * sr_out))
        if info.audio_seconds <= WHOLE_FILE_AUDIO_SECONDS:
            return np.fromfile(plan.audio, dtype=np.uint8), out0
        sr_in = info.audio_rate
        g = math.gcd(sr_in, sr_out)
        orig, new = sr_in // g, sr_out // g
        margin = int(_AUDIO_MARGIN_SECONDS * sr_in) + orig
        i0 = max(0, (int(plan.audio_start * sr_in) - margin) // orig * orig)
        i1 = int(math.ceil((plan.audio_start + plan.audio_length) * sr_in)) + margin
        with sf.SoundFile(plan.audio) as f:
            f.seek(min(i0, f.frames))
            pcm = f.read(max(0, min(i1, f.frames) - i0), dtype="float32", always_2d=True)
            rate = f.samplerate
        buf = io.BytesIO()
        sf.write(buf, pcm, rate, format="WAV", subtype="FLOAT")
        return np.frombuffer(buf.getvalue(), dtype=np.uint8), out0 - (i0 // orig) * new

    # --- iteration -----------------------------------------------------------------
    def _start(self) -> None:
        schedule_it = self.schedule.iterate(self._epoch, self._batch)
        self._pending.clear()
        device_id = self.device.index if self.gpu else None
        self._pipe = build_clip_pipeline(
            lambda: self._feed(schedule_it), self.spec, self.batch_size, gpu=self.gpu,
            device_id=device_id, num_threads=self.num_threads, prefetch=self.options.prefetch_factor, seed=self.options.seed,
        )

    def _to_torch(self, tensor_list: Any, dtype: torch.dtype) -> torch.Tensor:
        """Copy a dense DALI TensorList into a new torch tensor (device to device on the GPU).

        The copy is what makes the batch safe to keep: DALI reuses its output buffers at the
        next ``run()``.
        """
        from nvidia.dali.plugin.pytorch import feed_ndarray

        tensor = tensor_list.as_tensor()
        if self.gpu:
            out = torch.empty(tensor.shape(), dtype=dtype, device=self.device)
            return feed_ndarray(tensor, out, cuda_stream=torch.cuda.current_stream(self.device))
        return feed_ndarray(tensor, torch.empty(tensor.shape(), dtype=dtype))

    def _generate(self) -> Iterator[Dict[str, torch.Tensor]]:
        self._start()
        while True:
            try:
                video_tl, audio_tl = self._pipe.run()
            except StopIteration:
                break
            except TooMuchBadData:  # raised by _feed: not a decoding failure to recover from
                raise
            except RuntimeError as e:
                self._recover(e)
                continue
            meta = self._pending.popleft()
            plans: List[ClipPlan] = meta["plans"]
            batch: Dict[str, torch.Tensor] = {
                "video": self._to_torch(video_tl, torch.uint8),
                "audio": self._to_torch(audio_tl, torch.float32),
                "text": torch.from_numpy(np.stack([p.text for p in plans]).astype(np.int64, copy=False)),
                "text_mask": torch.from_numpy(np.stack([p.text_mask for p in plans]).astype(bool, copy=False)),
                "index": torch.tensor([p.index for p in plans], dtype=torch.int64),
            }
            if self.with_label:
                batch["label"] = torch.tensor([p.label for p in plans], dtype=torch.int64)
            self._account(*summarize_problems(meta["problems"]))
            yield self._deliver(batch, meta["epoch"], meta["batch"])
        self._pipe = None

    def _recover(self, error: Exception) -> None:
        """DALI failed on a batch in flight: find the broken records of the batches it was
        preparing and restart the pipeline at the oldest of those batches (their clips are
        drawn again, with replacements).

        A clip the PyAV reference decoder cannot decode makes its record a suspect: every clip of
        it is checked with the reference before it is fed, so the verdicts stay the PyAV
        backend's (a window away from corrupt packets is fine). When the reference decodes every
        clip, each is run through DALI alone; a record DALI cannot decode is rejected for good.
        """
        if not self._pending:
            raise error
        meta = self._pending[0]
        plans = [plan for pending in self._pending for plan in pending["plans"]]
        found = False
        for plan in plans:
            try:
                decode_with_pyav(plan, self.spec)
            except Exception:  # fed again, the clip fails the check in _attempt, which counts it
                self._suspects.add(plan.index)
                found = True
        if not found:  # the inputs are read again: the fed copies were not kept (DALI copies them)
            fed = []
            for plan in plans:
                try:
                    fed.append((plan, self._inputs(plan, self._media[plan.index])))
                except Exception as e:
                    self._broken[plan.index] = classify_error(e, self.records[plan.index])
                    found = True
            for (plan, _), dali_error in zip(fed, self._dali_alone([inputs for _, inputs in fed])):
                if dali_error is not None:
                    self._broken[plan.index] = ("unreadable", f"DALI cannot decode {plan.video} / {plan.audio} (the "
                                                              f"PyAV reference decoder can): {dali_error}")
                    found = True
        if not found:
            raise RuntimeError(
                f"DALI failed while preparing batch {meta['batch']} of epoch {meta['epoch']} (or the next ones in "
                f"flight), but decodes each of their clips alone and so does the PyAV reference; this is a DALI "
                f"problem, not bad data: {error}"
            ) from error
        self._pipe = None
        self._epoch, self._batch = meta["epoch"], meta["batch"]
        self._start()

    def _dali_alone(self, samples: List[Tuple[np.ndarray, ...]]) -> List[Optional[str]]:
        """DALI's error for each sample run alone through the clip pipeline (None: it decodes)."""
        queue: Deque[Tuple[np.ndarray, ...]] = deque(samples)

        def source():
            if not queue:
                raise StopIteration
            return tuple([column] for column in queue.popleft())

        errors: List[Optional[str]] = []
        pipe = None
        for _ in samples:
            if pipe is None:  # a pipeline that failed is not reused
                pipe = build_clip_pipeline(
                    source, self.spec, 1, gpu=self.gpu, device_id=self.device.index if self.gpu else None,
                    num_threads=1, prefetch=1, seed=self.options.seed, exec_async=False, exec_pipelined=False,
                )
            try:
                pipe.run()
                errors.append(None)
            except RuntimeError as e:
                errors.append(_dali_error_summary(e))
                pipe = None
        return errors

    def state_dict(self) -> Dict[str, Any]:
        """Position, bad-data counts, and the records found broken while decoding (see ``_recover``)."""
        return {**super().state_dict(), "dali_broken": [[i, kind, message] for i, (kind, message) in
                                                        sorted(self._broken.items())],
                "dali_suspects": sorted(self._suspects)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._broken = {int(i): (str(kind), str(message)) for i, kind, message in state.get("dali_broken", [])}
        self._suspects = {int(i) for i in state.get("dali_suspects", [])}

    def _shutdown(self) -> None:
        self._pipe = None
        self._pending.clear()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        return (
            f"DALILoader(records={len(self.records)}, batch_size={self.batch_size}, train={self.train}, "
            f"device={'cuda' if self.gpu else 'cpu'}, rank={self.options.rank}/{self.options.world_size}, "
            f"batches_per_epoch={len(self)})"
        )
