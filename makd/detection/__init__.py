"""Object detection with per-box aspect distillation: COCO data and the offline canvases, detectors with an
aspect head on region features, box-crop labelling through the label store, COCO mAP, the detection task of
the one training loop, drawing, and `makd demo detection`."""
