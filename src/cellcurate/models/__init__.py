"""Encoders, teacher, student, losses, distillation, post-processing, metrics, model export."""
