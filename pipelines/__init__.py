"""Model registry of dit-sparse (``dit_sparse.pipelines``): loading diffusers pipelines from a local
folder or the embedded default model, and writing videos."""
