"""What the driver actor, the client actors and the executor agree on, in a module without torch:
the process that launches a Ray run imports the actor classes, never what runs inside them."""

BYTES_PER_MB = 1024 * 1024
#: How actors format their log lines (Ray prefixes each with the actor's name and pid).
ACTOR_LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"
#: The outcome metric holding a job's peak GPU memory (``torch.cuda.max_memory_allocated``, MiB).
GPU_PEAK_METRIC = "gpu_peak_mb"
