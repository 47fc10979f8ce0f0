"""Capture: each task's gradient of the shared parameters, by the cheapest exact route the step
allows.

* :mod:`.select`: which capture serves a step (:class:`CaptureSelector`, :class:`Plan`): the mode
  rule, the batched pass's fallback to the loop, chunking, the timed choice (:mod:`.tuner`).
* :mod:`.run`: :class:`Capturer` runs a plan and returns one :class:`Captured`.
* the routes: :mod:`.loop` (one backward per task), :mod:`.batched` (one batched backward),
  :mod:`.feature` (heads per task, then one batched pass through the encoder), :mod:`.blocks`
  (the Gramian path's per-parameter blocks), :mod:`.representation` (the features' gradients and
  one backward through the encoder), :mod:`.hooks` (legacy ``task()`` blocks), :mod:`.weighted`
  (the loss-only route: one backward of ``sum_t w_t L_t``, no ``J``).
* :mod:`.accumulate`: gradient accumulation over micro-batches (accumulate ``J``, then combine).
* :mod:`.layout`: :class:`FlatLayout` (where each shared parameter lives in a row of ``J``) and
  :class:`SharedGrads` (the flat ``.grad`` buffer and the write-back).
* :mod:`._kernels`: the fused row kernel on CUDA beside its pure-PyTorch twin.

All routes give the same ``J`` as the loop up to float rounding (tested); task-specific tensors
get the sum of their task gradients.  Nothing here synchronises with the device.
"""

from ._kernels import RowStats
from .accumulate import Accumulation
from .batched import capture_batched, chunks
from .blocks import batched_shared_grads, jacobian_from_blocks
from .captured import CaptureBuffers, Captured
from .feature import capture_feature, feature_gradients
from .hooks import TaskHooks
from .layout import FlatLayout, SharedGrads
from .loop import capture_loop
from .representation import encoder_vjp
from .run import Capturer
from .select import CAPTURES, CaptureSelector, Plan, auto_chunk_size, available_memory
from .tuner import CaptureTuner
from .weighted import capture_weighted

__all__ = ["CAPTURES", "Accumulation", "CaptureBuffers", "CaptureSelector", "CaptureTuner", "Captured", "Capturer",
           "FlatLayout", "Plan", "RowStats", "SharedGrads", "TaskHooks", "auto_chunk_size", "available_memory",
           "batched_shared_grads", "capture_batched", "capture_feature", "capture_loop", "capture_weighted", "chunks",
           "encoder_vjp", "feature_gradients", "jacobian_from_blocks"]
