"""Evaluation: held-out loss and bits per byte (loss.py), multiple-choice log-likelihood scoring
and MMLU (multiple_choice.py, mmlu.py), task accuracy with pass@k (tasks.py), and the stage that
puts base, SFT and GRPO models side by side (stage.py)."""
