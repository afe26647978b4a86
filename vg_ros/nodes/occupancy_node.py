"""`occupancy_node`: TPVFormer over ROS 2 — the rig's surround images in, a Nav2 BEV grid, a semantic voxel
cloud and RViz markers out.

Subscribes, per camera NAME of the `cameras` parameter (default: the rig's cameras):
  image_topic_pattern        /cameras/NAME/image_raw     sensor_msgs/Image (sensor QoS; every colour encoding of
                                                         `convert.image_to_rgb`); image_transport compressed:
                                                         sensor_msgs/CompressedImage (jpeg, png) on .../compressed
  camera_info_topic_pattern  /cameras/NAME/camera_info   sensor_msgs/CameraInfo (intrinsics; the rig's when absent)
Images are synchronised by approximate time (`sync_slop`); after `missing_camera_timeout` a set goes on
without the cameras that did not deliver, and their sector of the grid becomes unknown (-1).
Extrinsics come from TF (tf2 or /tf_static) when available, else from the rig YAML.
Publishes, with the stamp of the set's first image and frame `base_frame`:
  grid_topic     /occupancy/grid     nav_msgs/OccupancyGrid (transient-local): 100 occupied in [z_min, z_max],
                                     0 observed free, -1 unseen
  voxels_topic   /occupancy/voxels   sensor_msgs/PointCloud2: observed occupied voxel centres, fields x, y, z
                                     (f32), label (u32 as PCL's PointXYZL, Occ3D class), confidence (f32)
  markers_topic  /occupancy/markers  visualization_msgs/MarkerArray: one CUBE_LIST per class, Occ3D colours
Bad input (wrong image size or encoding, zero focal length, NaN extrinsic) drops that camera with a log line
and a count in ~/diagnostics; a set with no usable camera is dropped; the node keeps running.
"""
from __future__ import annotations

import dataclasses
import threading

import numpy as np

from vg_ros.convert import stamp_of
from vg_ros.nodes.base import PerceptionNode
from vg_ros.nodes.inputs import usable_frames
from vg_ros.nodes.process import node_main
from vg_ros.nodes.topics import camera_topic
from vg_ros.occupancy.pipeline import OccupancyConfig
from vg_ros.types import FREE_CLASS, OCC_CLASSES, OCC_PALETTE, CameraFrame


class OccupancyNode(PerceptionNode):
    default_node_name = "occupancy_node"
    config_cls = OccupancyConfig
    node_params = {
        "cameras": (["CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_FRONT_LEFT", "CAM_BACK", "CAM_BACK_LEFT", "CAM_BACK_RIGHT"],
                    "camera names to subscribe (each must be in the rig)"),
        "image_topic_pattern": ("cameras/{name}/image_raw", "input sensor_msgs/Image per camera"),
        "images_rectified": (False, "the images are rectified (image_rect, as image_proc or Isaac ROS publish them): "
                             "intrinsics from CameraInfo's P, no distortion"),
        "image_transport": ("raw", "raw: sensor_msgs/Image on each image topic; compressed: sensor_msgs/"
                            "CompressedImage (jpeg, png) on <image topic>/compressed, as image_transport names it"),
        "camera_info_topic_pattern": ("cameras/{name}/camera_info", "input sensor_msgs/CameraInfo per camera"),
        "grid_topic": ("occupancy/grid", "output nav_msgs/OccupancyGrid (transient-local)"),
        "voxels_topic": ("occupancy/voxels", "output sensor_msgs/PointCloud2 with label and confidence"),
        "markers_topic": ("occupancy/markers", "output visualization_msgs/MarkerArray ('' = off)"),
        "sync_slop": (0.05, "largest stamp spread (s) of one synchronised image set"),
        "sync_queue": (10, "images queued per camera for synchronisation"),
        "missing_camera_timeout": (0.5, "seconds to wait for a late camera before going on without it"),
    }

    # the BEV band (read per grid) and the confidence floor (read per frame); the rest shapes the model,
    # the grid or the subscriptions: read at start
    live_params = frozenset({"z_min", "z_max", "min_confidence"})

    def on_parameters_changed(self, names: set[str]) -> None:
        self.pipeline.cfg = self.cfg

    def check_parameters(self) -> None:
        p = self.params
        names = [str(n) for n in p["cameras"]]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"occupancy_node.cameras = {names}: must be a non-empty list of distinct names")
        for key in ("sync_slop", "missing_camera_timeout"):
            if not 0 < float(p[key]) <= 1e6:
                raise ValueError(f"occupancy_node.{key} = {p[key]}: must be in (0, 1e6]")
        if not 1 <= int(p["sync_queue"]) <= 1000:
            raise ValueError(f"occupancy_node.sync_queue = {p['sync_queue']}: must be in [1, 1000]")
        for key in ("image_topic_pattern", "camera_info_topic_pattern"):
            if "{name}" not in str(p[key]):
                raise ValueError(f"occupancy_node.{key} = {p[key]!r}: must contain '{{name}}'")
        self.camera_names = names
        # resolved names (namespace, remapping), as the subscriptions have them; ValueError for an unknown transport
        self.image_topics = [self.resolve_topic_name(camera_topic(str(p["image_topic_pattern"]).format(name=n),
                                                                  str(p["image_transport"]))) for n in names]

    def load(self) -> None:
        from vg_ros.occupancy.pipeline import OccupancyPipeline

        for name in self.camera_names:
            self.extrinsics.rig.camera(name)  # KeyError naming the rig's cameras: an ERROR at configuration
        self.pipeline = OccupancyPipeline(self.cfg, weights=self.params["weights"], device=self.device)
        self._busy = threading.Lock()
        self.results = 0

    def start(self) -> None:
        from nav_msgs.msg import OccupancyGrid
        from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2
        from visualization_msgs.msg import MarkerArray

        self.camera_infos: dict[str, object] = {}
        p = self.params
        self.grid_pub = self.create_publisher(OccupancyGrid, p["grid_topic"], self.latched_qos())
        self.voxels_pub = self.create_publisher(PointCloud2, p["voxels_topic"], self.output_qos())
        self.markers_pub = (self.create_publisher(MarkerArray, p["markers_topic"], self.output_qos())
                            if p["markers_topic"] else None)
        image_type = CompressedImage if p["image_transport"] == "compressed" else Image
        for name in self.camera_names:
            self.subscribe(CameraInfo, str(p["camera_info_topic_pattern"]).format(name=name),
                           lambda msg, n=name: self.camera_infos.__setitem__(n, msg), self.sensor_qos(),
                           guard_stamps=False)
        self.sync = self.synchronized([(image_type, t) for t in self.image_topics], self.on_images,
                                      slop_s=float(p["sync_slop"]), queue_size=int(p["sync_queue"]),
                                      partial_timeout_s=float(p["missing_camera_timeout"]), min_topics=1)
        g = self.pipeline.grid
        self.get_logger().info(f"TPVFormer {self.cfg.model} ({self.pipeline.metadata.get('steps', '?')} training "
                               f"steps) on {self.device}; grid {g.shape} at {g.voxel_size} m; cameras {self.camera_names}")

    def unload(self) -> None:
        self.pipeline = None

    # -- inputs

    def camera_frame(self, name: str, image_msg) -> CameraFrame:
        """One camera's frame from its image, its CameraInfo (else the rig) and TF (else the rig). ValueError/KeyError."""
        from vg_ros.convert import camera_info_to_model, image_to_rgb
        from vg_ros.occupancy.pipeline import check_frame
        T_base_cam, _source = self.extrinsics.lookup(image_msg.header.frame_id or name)
        info = self.camera_infos.get(name)
        if info is not None:
            camera = camera_info_to_model(info, name=name, T_base_cam=T_base_cam,
                                          rectified=bool(self.params["images_rectified"]))
        else:
            camera = dataclasses.replace(self.extrinsics.rig.camera(name), T_base_cam=T_base_cam)
        frame = CameraFrame(camera, image_to_rgb(image_msg), stamp_of(image_msg))
        check_frame(frame)
        return frame

    def on_images(self, *images) -> None:
        if self.pipeline is None:
            return
        stamp, frames = usable_frames(self.camera_names, images,
                                      lambda i, msg: self.camera_frame(self.camera_names[i], msg), self.drops,
                                      self.image_topics)
        if not frames:
            return
        if not self._busy.acquire(blocking=False):
            self.drops.drop("busy", f"set {stamp}: still processing the previous set")
            return
        try:
            result = self.pipeline.infer(frames, stamp)
        finally:
            self._busy.release()
        self.publish(result)
        self.drops.ok()

    # -- outputs

    def publish(self, result) -> None:
        from vg_ros.convert import array_to_occupancy_grid, xyz_fields_to_pointcloud2
        from vg_ros.geometry import voxel_centers
        from vg_ros.occupancy.pipeline import bev_occupancy
        frame_id = str(self.params["base_frame"])
        bev, origin_T, resolution = bev_occupancy(result, self.cfg.z_min, self.cfg.z_max)
        self.grid_pub.publish(array_to_occupancy_grid(bev, resolution, origin_T, stamp_ns=result.stamp_ns,
                                                      frame_id=frame_id))
        occupied = (result.semantics != FREE_CLASS) & result.observed
        centres = voxel_centers(result.grid)[occupied]
        labels = result.semantics[occupied].astype(np.uint8)
        # label uint32 at offset 12 as PCL's PointXYZL / PointXYZRGBL, so pcl::fromROSMsg reads it
        self.voxels_pub.publish(xyz_fields_to_pointcloud2(
            centres, {"label": labels.astype(np.uint32), "confidence": result.confidence[occupied].astype(np.float32)},
            stamp_ns=result.stamp_ns, frame_id=frame_id))
        if self.markers_pub is not None:
            self.markers_pub.publish(self.markers(centres, labels, result.grid.voxel_size, result.stamp_ns, frame_id))
        self.results += 1

    @staticmethod
    def markers(centres: np.ndarray, labels: np.ndarray, size: float, stamp_ns: int, frame_id: str):
        """A DELETEALL, then one CUBE_LIST per present class in its Occ3D colour (namespace = class name)."""
        from geometry_msgs.msg import Point
        from std_msgs.msg import ColorRGBA
        from visualization_msgs.msg import Marker, MarkerArray

        from vg_ros.convert import make_header
        out = MarkerArray()
        clear = Marker()
        clear.action = Marker.DELETEALL
        out.markers.append(clear)
        for cls in np.unique(labels):
            m = Marker()
            m.header = make_header(stamp_ns, frame_id)
            m.ns, m.id, m.type, m.action = OCC_CLASSES[int(cls)], int(cls), Marker.CUBE_LIST, Marker.ADD
            m.pose.orientation.w = 1.0
            m.scale.x = m.scale.y = m.scale.z = float(size)
            r, g, b = (OCC_PALETTE[int(cls)] / 255.0).tolist()
            m.color = ColorRGBA(r=r, g=g, b=b, a=1.0)
            m.points = [Point(x=float(x), y=float(y), z=float(z)) for x, y, z in centres[labels == cls]]
            out.markers.append(m)
        return out


main = node_main(OccupancyNode)

if __name__ == "__main__":
    main()
