"""Concurrent adversarial learning: attacks, the three training steps, the loop, export."""
