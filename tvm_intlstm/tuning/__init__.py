"""MetaSchedule autotuning of the int8 GEMMs (tvm_intlstm.tuning).

    til.tuning.tune(qmodel, target, example_inputs, trials=64, log_dir="tuning_logs/znver3")
    tuned = til.tuning.apply_tuning_logs("tuning_logs/znver3", target)
    tuned.get(K, O, "int16")   # -> scheduled PrimFunc for the compiler, or None (default kernel)

    til.tuning.tune(qmodel, "rpi5", example_inputs, trials=64, rpc="board:9090")   # on a board

One idea a file: tune.py (the driver: search, resume, RPC), tasks.py (the GEMMs of a model),
database.py (the logs on disk, validated), baselines.py (the default kernel a record must beat),
replay.py (applying records to the compiler's symbolic-N kernels), targets.py (record/target
agreement), gemm.py and x86_wide.py (block-form kernels, design spaces, tensor intrinsics) and
_ms.py (in-process builder/runner, RPC builder/runner, cheap imports).
"""
from ._ms import RPCConfig, RPCTuningError
from .gemm import gemm_blocks, register_intrinsics, schedule_gemm
from .database import TuningLogError, TuningLogWarning, validate_logs
from .replay import TunedKernels, apply_tuning_logs
from .tasks import GemmTask, extract_tasks, tasks_from_module
from .tune import tune

__all__ = ["tune", "apply_tuning_logs", "extract_tasks", "tasks_from_module", "GemmTask",
           "TunedKernels", "TuningLogError", "TuningLogWarning", "validate_logs",
           "gemm_blocks", "schedule_gemm", "register_intrinsics", "RPCConfig", "RPCTuningError"]
