"""The flow kind (MoLE-Flow): parts.py the shared couplings and a task's own parts, kind.py the fit
and the scorer, settings.py its config section. Nothing is imported here, so reading the settings
(torch-free) never loads torch."""
