"""MultiTaskOptimizer: placeholder while the core lands (see issue 2)."""


class MultiTaskOptimizer:  # pragma: no cover - replaced by the real wrapper in the next commit
    def __init__(self, *args, **kwargs):
        raise NotImplementedError("MultiTaskOptimizer is being written")
