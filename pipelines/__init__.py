"""Model registry of dit-sparse (``dit_sparse.pipelines``): loading diffusers pipelines from a local
folder or the embedded default model, and writing videos.

* :mod:`.registry` - ``load_pipeline(model="default" | folder, ...)``, ``valid_video_size(pipe, ...)``
* :mod:`.default_model` - the embedded tiny Wan text-to-video model (``build_default_pipeline``,
  ``save_default_model``); its weights ship in the package folder ``default_model/``
* :mod:`.word_tokenizer` - the default model's word-level tokenizer
* :mod:`.video` - ``write_video(frames, path, fps)``: atomic mp4 writing
"""
