"""Baselines of the LightCRL comparison: ConVIRT (end-to-end, raw inputs) and ASIF (training-free).

The two-tower (CLIP/LiT-style heads on frozen features) baseline is ``model.arch: two_tower`` of the
ordinary trainer. Submodules are imported on use: ConVIRT pulls in the encoders' dependencies.
"""
