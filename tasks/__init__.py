"""seqio task registrations for t5tpu: import a module to register its tasks."""
