"""Process level, knowing no model: exit codes, devices and cluster start-up,
preemption, the run directory, the metrics log, the launcher and restart
supervisor, and the spare-device mechanics. ``launch``, ``restart`` and
``exit_codes`` import no jax (a supervisor stays light)."""
