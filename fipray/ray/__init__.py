"""Ray integrations of fipray: the only package that imports ``ray``.

Submodules import ray themselves; importing ``fipray.ray`` alone does not, so that the package
can be listed and documented where Ray is absent. ``fipray.ray.local.init_local`` is the one place that starts
(or joins) Ray for every fipray job.
"""
