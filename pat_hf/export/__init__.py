"""What a distilled student costs against its teacher, and its deployment formats (ONNX, int8 ONNX)."""
