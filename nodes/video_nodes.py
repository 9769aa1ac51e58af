"""TuneAVideoLoadFrames / TuneAVideoSaveVideo: the clip in and out; the logic lives in sampling/video_*.py."""
from ..sampling import video_decode, video_encode, video_inputs
from ..sampling.validation import check_filename_prefix, validation_message


class TuneAVideoLoadFrames:
    DESCRIPTION = ("Samples a Tune-A-Video clip from a video in ComfyUI's input folder (mp4, webm, mov, "
                   "gif, animated webp, or a folder of images): frame_load_cap frames, every "
                   "select_every_nth one after skip_first_frames, each resized and centre-cropped to "
                   "width x height. Only the needed frames are decoded. A video too short for the "
                   "request is an error, not a shorter clip.")
    CATEGORY = "Tune-A-Video"
    RETURN_TYPES = ("IMAGE", "INT", "FLOAT")
    RETURN_NAMES = ("frames", "frame_count", "fps")
    OUTPUT_TOOLTIPS = ("The clip as an IMAGE batch [frames, height, width, 3].",
                       "Number of frames loaded (= frame_load_cap).",
                       "Frame rate of the loaded clip: the source fps divided by select_every_nth "
                       "(image folders count as 8 fps), so saving at this rate plays in real time.")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "video": (video_inputs.list_input_videos(), {"video_upload": True, "tooltip":
                "A video file or image folder in ComfyUI's input folder. Upload mp4/webm with the "
                "button; put mov, gif, webp or a folder of numbered images there yourself."}),
            "frame_load_cap": ("INT", {"default": 24, "min": 1, "max": 4096, "tooltip":
                "How many frames the clip has. Tune-A-Video tunes on 8-24."}),
            "skip_first_frames": ("INT", {"default": 0, "min": 0, "max": 1_000_000, "tooltip":
                "Start at this frame of the video (0 = the first frame)."}),
            "select_every_nth": ("INT", {"default": 2, "min": 1, "max": 1000, "tooltip":
                "Take every n-th frame (1 = every frame). Tune-A-Video samples with a stride."}),
            "width": ("INT", {"default": 512, "min": 64, "max": 4096, "step": 8, "tooltip":
                "Output width, a multiple of 8. Frames are scaled to cover width x height and the "
                "centre is cut out (no stretching)."}),
            "height": ("INT", {"default": 512, "min": 64, "max": 4096, "step": 8, "tooltip":
                "Output height, a multiple of 8."}),
        }, "optional": {
            "video_input": ("VIDEO", {"tooltip":
                "Optional core VIDEO (e.g. from Load Video or Create Video). When connected it is "
                "sampled instead of the `video` file."}),
        }}

    def load(self, video, frame_load_cap, skip_first_frames, select_every_nth, width, height,
             video_input=None):
        args = (frame_load_cap, skip_first_frames, select_every_nth, width, height)
        if video_input is not None:
            clip = video_decode.load_frames_from_video(video_input, *args)
        else:
            clip = video_decode.load_frames(video_inputs.resolve_input_path(video), *args,
                                        label=f"video '{video}'")
        return (clip.frames, clip.frames.shape[0], clip.fps)

    @classmethod
    def IS_CHANGED(cls, video, **_):
        return video_inputs.input_signature(video)

    @classmethod
    def VALIDATE_INPUTS(cls, video):
        # Taking `video` here skips the combo's "value not in list" check, so API clients can name
        # files in subfolders or annotated ones ("clip.mp4 [output]"); existence is checked at run
        # time, where a connected video_input may make the file unnecessary.
        if isinstance(video, str) and video.strip():
            return validation_message(video_inputs.check_input_name, video)
        return True


VIDEO_OUTPUT = video_encode.core_video_type()  # ComfyUI before the core VIDEO type: no output socket


class TuneAVideoSaveVideo:
    DESCRIPTION = ("Saves frames as an mp4 (h264), gif or animated webp in ComfyUI's output folder, "
                   "shows it on the node and lists the file under this node's outputs in /history "
                   "(filename, subfolder, type, format, frame_rate, frame_count). Also outputs the clip as "
                   "a core VIDEO for Save Video, Get Video Components and other VIDEO nodes.")
    CATEGORY = "Tune-A-Video"
    RETURN_TYPES = ("VIDEO",) if VIDEO_OUTPUT else ()
    OUTPUT_TOOLTIPS = ("The frames at fps as a core VIDEO (lossless, not re-read from the file).",) if VIDEO_OUTPUT else ()
    OUTPUT_NODE = True
    FUNCTION = "save"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "images": ("IMAGE", {"tooltip": "The frames of the clip, in order."}),
            "fps": ("FLOAT", {"default": 8.0, "min": 0.1, "max": 120.0, "step": 0.1, "tooltip":
                "Playback rate. Connect Load Frames' fps to keep the source speed."}),
            "format": (list(video_encode.SAVE_FORMATS), {"default": "mp4", "tooltip":
                "mp4: h264, small, plays everywhere (odd sizes lose a last row/column). gif: 256 "
                "colours, at most 50 fps (frame times in 1/100 s). webp: animated, good quality."}),
            "filename_prefix": ("STRING", {"default": "TuneAVideo/clip", "tooltip":
                "File name start inside the output folder, may include a subfolder "
                "(TuneAVideo/clip). A counter is appended: clip_00001_.mp4."}),
        }, "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}

    def save(self, images, fps, format, filename_prefix, prompt=None, extra_pnginfo=None):
        from comfy.cli_args import args

        metadata = None
        if not args.disable_metadata:
            metadata = {**(extra_pnginfo or {}), **({"prompt": prompt} if prompt is not None else {})}
        ui = video_encode.save_clip(images, fps, format, filename_prefix, metadata or None)
        return {"ui": ui, "result": (video_encode.as_video(images, fps),) if VIDEO_OUTPUT else ()}

    @classmethod
    def VALIDATE_INPUTS(cls, filename_prefix=None):  # None: linked, checked when the node runs
        return validation_message(check_filename_prefix, filename_prefix)
