"""Knowledge distillation of a student into a teacher's next-token distribution.

from slimserve.distill import DistillConfig, distill
distill(teacher, student, data, DistillConfig(steps=500), "runs/student")
"""

from slimserve.distill.config import DistillConfig, DistillError
from slimserve.distill.loop import DistillResult, distill

__all__ = ["DistillConfig", "DistillError", "DistillResult", "distill"]
