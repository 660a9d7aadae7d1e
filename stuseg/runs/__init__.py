"""Cohorts: many scans through one model load.

One job per module, lower ones never importing higher ones: ``folder`` (the batch folder's own
file names), ``cases`` (discovery), ``settings`` (what a result depends on), ``runlog`` (the
typed run log), ``resume`` (which cases are done), ``process`` (one case), ``local`` (one
machine, stages overlapped), ``cluster`` (the same cases on a Ray cluster), ``signals`` (Ctrl-C
and SIGTERM).
``stuseg.batch`` re-exports their public names.
"""

__all__: list[str] = []
