"""Re-execution of recorded runs: planning jobs, executors, workers and code-version propagation."""

# What a replay fork server imports once, when installed (what training scripts import; an
# optimizer's constructor imports torch._dynamo: seconds). Its jobs start with them imported.
PRELOAD = ("numpy", "torch", "torch._dynamo", "torch.utils.data", "torchvision", "florql.replay.worker")
