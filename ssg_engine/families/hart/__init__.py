"""HART (mit-han-lab/hart): text-to-image next-scale prediction with a hybrid tokenizer (discrete multi-scale
codes plus a continuous residual drawn by a small diffusion head at the last scale)."""
