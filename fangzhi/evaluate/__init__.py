"""Evaluation: human-ratings analysis (Table 2, paired tests, reliability, power) and CLIP scores.

Import from the modules themselves (`fangzhi.evaluate.analyze`, `.clip_score`, ...): the package imports
nothing, so the ratings analysis loads no torch and CLIP scoring loads no rating-analysis packages
(a GPU machine for CLIP scoring need not have krippendorff or pingouin).
"""
