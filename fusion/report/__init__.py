"""The report layer, the one place that writes a run's outputs: the console table (:mod:`.tables`), the files of a
learned merge written from its :class:`fusion.param.contract.MergeRecord` (:mod:`.merge_files`), plots
(:mod:`.plots`) and sweep aggregation (:mod:`.sweeps`, the ``fusion-report`` command)."""
