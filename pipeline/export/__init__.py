"""Export: a run's encoders as stock transformers models (``transformers_models``), an image–text
CLIP pair as a stock ``VisionTextDualEncoderModel`` (``dual_encoder``), audio–text CLIP in the stage
layout (``stage_clip``), diffusion-conditioning components (``conditioning``), and the parity figures
that prove each one computes what the training-time module computed (``parity``)."""
