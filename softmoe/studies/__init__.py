"""Studies, above the library: a study file planned into runs (plan.py), trained and evaluated (run.py),
aggregated into results (results.py), per-run summaries (summaries.py), the paper-claims report (study_report.py),
the run report (report.py) and the main job (main_job.py)."""
