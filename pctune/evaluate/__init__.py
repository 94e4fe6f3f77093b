"""Promotion stages: ImageNet-C and adversarial evaluation."""
