"""The memory kind (a coreset of the task's training patches): bank.py its part and scorer,
coreset.py and inverted_lists.py how the bank is chosen and searched, kind.py the fit, settings.py
its config section. Nothing is imported here, so reading the settings (torch-free) never loads torch."""
