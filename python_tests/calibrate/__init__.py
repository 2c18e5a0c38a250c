"""Skip plans (vskip_kernels.plan: validation, the JSON format) and their calibration on tiny
random models (vskip_kernels.calibrate; marked ``hf``)."""
