"""dpo_lab: from Bradley-Terry to Direct Preference Optimization, with real training code."""

__version__ = "0.1.0"
