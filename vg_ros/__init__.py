"""vg_ros: ROS 2 perception with TPVFormer (occupancy), VBReg (registration) and VG-LAW (grounding)."""
__version__ = "0.1.0"
