"""The pieces of the common training loop (``hv_train_network.NetworkTrainer`` orchestrates them).

One job per module: ``args`` (common parser, config files), ``timesteps`` (noise levels and loss weights),
``optimizers``, ``lr_schedulers``, ``saving`` (names, pruning, atomic LoRA writes), ``metadata``, ``resume``
(state directories and ``train_state.json``), ``accel`` (Accelerator set-up), ``data`` (data loaders),
``sampling`` (samples during training), ``sample_output`` (PNG/MP4 writers), ``validation`` (validation loss).
"""
