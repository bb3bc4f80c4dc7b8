"""The on-policy distillation runner, one stage per module.

Read in the order a step runs: ``config`` (TOML -> dataclasses) -> ``models`` (HF models, hidden
states, heads, compatibility checks; ``hub`` finds a model id's files in the HF cache) -> ``data``
(prompts and the sampler; ``sources`` reads the prompt formats) -> ``rollout`` (student
samples, KV cache) -> ``score`` (teachers, routed by domain) -> ``learn`` (fused loss, optimizer) ->
``checkpoint`` / ``metrics`` (``trackers``: TensorBoard, wandb, MLflow) / ``evaluate`` -> ``trainer``
(the loop; ``train(config) -> summary``).
Around the loop: ``preflight`` (start-up checks), ``run_dir`` (new run / resume / overwrite rules and
the config history), ``signals`` (clean stop, force-quit), ``files`` (fsync, atomic writes),
``distributed`` (torchrun data parallel) and ``sharding`` (its FSDP2 students and teachers).

Stable entry points: ``config.load_config`` / ``config.RunConfig`` (+ sections), ``trainer.train``,
``trainer.Trainer``, ``evaluate.evaluate_run`` / ``evaluate.evaluate``, ``metrics.read_metrics``,
``models.load_model``, ``rollout.rollout``. The CLI wraps them: ``opd-fast train|eval|generate|plot``.
"""
