"""The toy world: IAP at small scale, from data to the embedded default model (``iap-rt toy``).

32x32 images of one or two coloured shapes with independently written English and Chinese
captions; a miniature English SD trained from scratch; Chinese encoders trained against it; a
numpy checker that reads what was drawn. ``train/toy/README.md`` tells the story and the
numbers. Modules, in the order the data flows:

- :mod:`.shapes` one shape: attributes, colours, geometry, drawing
- :mod:`.scenes` combos of one or two shapes, the held-out split, drawing a scene
- :mod:`.captions` English and Chinese captions of a combo, their vocabularies
- :mod:`.data` the dataset files (``iap-rt toy data``) and their readers
- :mod:`.checker` the numpy checker and its training (``iap-rt toy checker``)
- :mod:`.vae` the fixed, lossless pixel-space AutoencoderKL
- :mod:`.base_model` the English base: config, networks, word tokenizer, directory
- :mod:`.base` training the English base (``iap-rt toy base``)
- :mod:`.train_state` the checkpoint of the toy trainers
- :mod:`.evaluate` generating for held-out prompts and scoring them (``iap-rt toy eval``)
- :mod:`.workdir` work directories: resumable worker processes, what they belong to
- :mod:`.transfer` the transfer grid (``iap-rt toy transfer``)
- :mod:`.report` the grid's result files
- :mod:`.claim` the paper's claim at equal compute (``iap-rt toy claim``)
- :mod:`.curves` learning curves (``iap-rt toy curves``)
- :mod:`.finetune` a restyled UNet and the plug-in run (``iap-rt toy finetune`` / ``plugin``)
- :mod:`.cli` the ``iap-rt toy`` command group
"""
