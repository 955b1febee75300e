"""The queue: every generation goes in here (`InferenceQueue`); `admission` decides when it
runs, `generation` is one request's life."""

from .admission import Admission, Ticket
from .generation import Generation, Outcome
from .inference import InferenceQueue, QueueFull, RequestFinished

__all__ = ["Admission", "Generation", "InferenceQueue", "Outcome", "QueueFull",
           "RequestFinished", "Ticket"]
