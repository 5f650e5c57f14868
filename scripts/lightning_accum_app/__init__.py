"""The Hydra app behind ``scripts/train.py``: build and run a job, launch helpers, sweep summaries, plots.

It lives beside ``conf/`` and outside the installed package, which never imports Hydra. ``scripts/train.py``
puts this folder on ``PYTHONPATH`` so that processes it starts (Slurm jobs, joblib workers) import it too.
"""
