"""Recovery: distil a shrunk student from its teacher or train it, evaluate it, generate with it.

:mod:`.training` is the run (accelerate: one process, DDP; :mod:`.fsdp` FSDP2); :mod:`.losses`
the objectives as sums over counted tokens; :mod:`.teacher_cache` the teacher's top-k per block,
kept; :mod:`.checkpoints` atomic, exactly resumable checkpoints (:mod:`.sharded_checkpoints`
for a sharded run); :mod:`.trackers` TensorBoard / W&B; :mod:`.evaluation` held-out metrics and
generation; :mod:`.lm_tasks` lm-eval-harness tasks on loaded models.
"""

from .batching import BatchPlan, as_train_data
from .checkpoints import latest_checkpoint
from .config import PRECISIONS, RUN_FILE, TRAIN_MODES, TrainConfig, TrainingDiverged, TrainResult
from .evaluation import chat_prompt, compare, evaluate, generate
from .lm_tasks import evaluate_tasks, resolve_tasks, task_manager
from .losses import loss_sums, model_outputs, teacher_targets
from .teacher_cache import TeacherCache
from .training import check_run_dir, check_vocab, distill, train

__all__ = [
    "BatchPlan", "PRECISIONS", "RUN_FILE", "TRAIN_MODES", "TeacherCache", "TrainConfig", "TrainResult",
    "TrainingDiverged", "as_train_data", "chat_prompt", "check_run_dir", "check_vocab", "compare", "distill",
    "evaluate", "evaluate_tasks", "generate", "latest_checkpoint", "loss_sums", "model_outputs", "resolve_tasks",
    "task_manager", "teacher_targets", "train",
]
