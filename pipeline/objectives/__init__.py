"""Objectives, one per file (``mlm``, ``mae``, ``data2vec``, ``clip``): each holds ``Config`` and
``Objective`` (see ``pipeline.objectives.base``). Found by file name through ``pipeline.registry``."""
