"""Training: the loop (``trainer``), strategies (``parallelize``), checkpoints, optimizer, logging.

Entry point: ``launch/train.py``; programmatic use::

    from dist_audio.train.trainer import Trainer, make_accelerator
    trainer = Trainer(cfg, make_accelerator(cfg), resume=True)
    result = trainer.train()
"""
