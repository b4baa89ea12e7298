"""MetaSchedule autotuning of the int8 GEMMs (tvm_intlstm.tuning).

    til.tuning.tune(qmodel, target, example_inputs, trials=64, log_dir="tuning_logs/znver3")
    tuned = til.tuning.apply_tuning_logs("tuning_logs/znver3", target)
    tuned.get(K, O, "int16")   # -> scheduled PrimFunc for the compiler, or None (default kernel)

    til.tuning.tune(qmodel, "rpi5", example_inputs, trials=64, rpc="board:9090")   # on a board

See tune.py (tasks, database, resume, symbolic N, RPC), gemm.py (the block-form kernels, the
design space, the AVX2 vpmaddwd TensorIntrin) and _ms.py (in-process builder/runner, RPC
builder/runner, cheap imports).
"""
from ._ms import RPCConfig, RPCTuningError
from .gemm import gemm_blocks, register_intrinsics, schedule_gemm
from .tune import (GemmTask, TunedKernels, TuningLogError, TuningLogWarning, apply_tuning_logs,
                   extract_tasks, tasks_from_module, tune, validate_logs)

__all__ = ["tune", "apply_tuning_logs", "extract_tasks", "tasks_from_module", "GemmTask",
           "TunedKernels", "TuningLogError", "TuningLogWarning", "validate_logs",
           "gemm_blocks", "schedule_gemm", "register_intrinsics", "RPCConfig", "RPCTuningError"]
