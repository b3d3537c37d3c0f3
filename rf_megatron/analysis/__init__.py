"""Analysis of trained checkpoints: `attention_stats` (attention entropy, first-token mass and hidden-state
similarity per layer: the paper's attention-concentration evidence; tools/analyze_attention.py)."""
