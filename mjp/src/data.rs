//! Real datasets: IDX (MNIST, Fashion-MNIST; gzipped or raw), CIFAR-10/100 binary batches and an
//! ImageFolder of PNG/JPEG files. Images are kept as bytes (CHW) and turned into f32 pixels in
//! [0, 1] per batch; normalisation is the model's job.

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use rand::Rng;
use rand::seq::SliceRandom;

use crate::error::{MjpError, Result};

/// Which half of a dataset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    /// Training images.
    Train,
    /// Held-out test images.
    Test,
}

/// Where a dataset comes from.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum DataSource {
    /// Fashion-MNIST IDX files under `<data-dir>/fashion-mnist` (or Debian's package path).
    FashionMnist,
    /// MNIST IDX files under `<data-dir>/mnist`.
    Mnist,
    /// IDX files in a directory (`train-images-idx3-ubyte[.gz]` ...).
    Idx(PathBuf),
    /// CIFAR-10 binary batches (`data_batch_{1..5}.bin`, `test_batch.bin`).
    Cifar10(PathBuf),
    /// CIFAR-100 binary files (`train.bin`, `test.bin`; fine labels).
    Cifar100(PathBuf),
    /// An ImageFolder: `<dir>/[train|test]/<class>/*.png|jpg`.
    Folder(PathBuf),
}

impl FromStr for DataSource {
    type Err = MjpError;
    fn from_str(s: &str) -> Result<Self> {
        let (kind, path) = match s.split_once(':') {
            Some((k, p)) => (k, Some(PathBuf::from(p))),
            None => (s, None),
        };
        match (kind, path) {
            ("fashion-mnist", None) => Ok(Self::FashionMnist),
            ("mnist", None) => Ok(Self::Mnist),
            ("idx", Some(p)) => Ok(Self::Idx(p)),
            ("cifar10", Some(p)) => Ok(Self::Cifar10(p)),
            ("cifar100", Some(p)) => Ok(Self::Cifar100(p)),
            ("folder", Some(p)) => Ok(Self::Folder(p)),
            _ => Err(MjpError::Config(format!(
                "unknown dataset `{s}`: use fashion-mnist, mnist, idx:DIR, cifar10:DIR, \
                 cifar100:DIR or folder:DIR"
            ))),
        }
    }
}

impl TryFrom<String> for DataSource {
    type Error = MjpError;
    fn try_from(s: String) -> Result<Self> {
        s.parse()
    }
}

impl From<DataSource> for String {
    fn from(d: DataSource) -> String {
        d.to_string()
    }
}

impl fmt::Display for DataSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::FashionMnist => write!(f, "fashion-mnist"),
            Self::Mnist => write!(f, "mnist"),
            Self::Idx(p) => write!(f, "idx:{}", p.display()),
            Self::Cifar10(p) => write!(f, "cifar10:{}", p.display()),
            Self::Cifar100(p) => write!(f, "cifar100:{}", p.display()),
            Self::Folder(p) => write!(f, "folder:{}", p.display()),
        }
    }
}

/// Debian's `dataset-fashion-mnist` package installs here.
pub const DEBIAN_FASHION_MNIST: &str = "/usr/share/datasets/fashion-mnist";

impl DataSource {
    /// Loads one split, resized to `size` and converted to `channels` when given.
    pub fn load(&self, split: Split, data_dir: &Path) -> Result<Dataset> {
        match self {
            Self::FashionMnist => load_idx(&fashion_mnist_dir(data_dir), split, "fashion-mnist"),
            Self::Mnist => load_idx(&data_dir.join("mnist"), split, "mnist"),
            Self::Idx(dir) => load_idx(dir, split, &dir.display().to_string()),
            Self::Cifar10(dir) => load_cifar(dir, split, false),
            Self::Cifar100(dir) => load_cifar(dir, split, true),
            Self::Folder(dir) => load_folder(dir, split),
        }
    }

    /// The labels of one split and the number of classes, without decoding images where the
    /// format keeps labels apart (IDX): what a coordinator needs to know the partition sizes.
    pub fn labels(&self, split: Split, data_dir: &Path) -> Result<(Vec<u32>, usize)> {
        let idx_dir = match self {
            Self::FashionMnist => Some(fashion_mnist_dir(data_dir)),
            Self::Mnist => Some(data_dir.join("mnist")),
            Self::Idx(dir) => Some(dir.clone()),
            Self::Cifar10(_) | Self::Cifar100(_) | Self::Folder(_) => None,
        };
        match idx_dir {
            Some(dir) => Ok((idx_labels(&dir, split)?.1, 10)),
            None => {
                let ds = self.load(split, data_dir)?;
                Ok((ds.labels, ds.num_classes))
            }
        }
    }
}

/// Where Fashion-MNIST is read from: `data_dir` if fetched there, else Debian's package.
fn fashion_mnist_dir(data_dir: &Path) -> PathBuf {
    let local = data_dir.join("fashion-mnist");
    if local.exists() || !Path::new(DEBIAN_FASHION_MNIST).exists() {
        local
    } else {
        PathBuf::from(DEBIAN_FASHION_MNIST)
    }
}

/// An in-memory labelled image set.
#[derive(Clone, Debug)]
pub struct Dataset {
    /// Human-readable name.
    pub name: String,
    /// Channels per image.
    pub channels: usize,
    /// Image side (images are square).
    pub size: usize,
    /// Number of classes.
    pub num_classes: usize,
    /// Pixels, `n * C * H * W` bytes, CHW per image.
    pub images: Vec<u8>,
    /// One label per image.
    pub labels: Vec<u32>,
}

/// Simple augmentation for training batches.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Augment {
    /// Zero padding for a random crop (0 disables).
    pub crop_padding: usize,
    /// Random horizontal flip with probability 0.5.
    pub hflip: bool,
}

impl Dataset {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there are no images.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Values per image.
    pub fn image_len(&self) -> usize {
        self.channels * self.size * self.size
    }

    /// Image `i` as f32 pixels in [0, 1].
    pub fn image(&self, i: usize) -> Vec<f32> {
        let n = self.image_len();
        self.images[i * n..(i + 1) * n]
            .iter()
            .map(|&b| f32::from(b) / 255.0)
            .collect()
    }

    /// A dataset made of the given images.
    pub fn subset(&self, indices: &[usize]) -> Dataset {
        let n = self.image_len();
        let mut images = Vec::with_capacity(indices.len() * n);
        for &i in indices {
            images.extend_from_slice(&self.images[i * n..(i + 1) * n]);
        }
        Dataset {
            name: self.name.clone(),
            channels: self.channels,
            size: self.size,
            num_classes: self.num_classes,
            images,
            labels: indices.iter().map(|&i| self.labels[i]).collect(),
        }
    }

    /// The first `n` images (or all).
    pub fn take(&self, n: usize) -> Dataset {
        let indices: Vec<usize> = (0..n.min(self.len())).collect();
        self.subset(&indices)
    }

    /// Pixels and labels of a batch, with optional augmentation.
    pub fn batch(
        &self,
        indices: &[usize],
        augment: Augment,
        rng: &mut impl Rng,
    ) -> (Vec<f32>, Vec<u32>) {
        let mut pixels = Vec::with_capacity(indices.len() * self.image_len());
        for &i in indices {
            let image = self.image(i);
            if augment == Augment::default() {
                pixels.extend(image);
            } else {
                pixels.extend(self.augment(&image, augment, rng));
            }
        }
        (pixels, indices.iter().map(|&i| self.labels[i]).collect())
    }

    fn augment(&self, image: &[f32], augment: Augment, rng: &mut impl Rng) -> Vec<f32> {
        let s = self.size;
        let pad = augment.crop_padding;
        let (dy, dx) = if pad > 0 {
            (
                rng.random_range(0..=2 * pad) as isize - pad as isize,
                rng.random_range(0..=2 * pad) as isize - pad as isize,
            )
        } else {
            (0, 0)
        };
        let flip = augment.hflip && rng.random_bool(0.5);
        let mut out = vec![0.0; image.len()];
        for c in 0..self.channels {
            for y in 0..s {
                for x in 0..s {
                    let sy = y as isize + dy;
                    let sx0 = if flip { s - 1 - x } else { x };
                    let sx = sx0 as isize + dx;
                    if sy >= 0 && sx >= 0 && (sy as usize) < s && (sx as usize) < s {
                        out[c * s * s + y * s + x] =
                            image[c * s * s + sy as usize * s + sx as usize];
                    }
                }
            }
        }
        out
    }

    /// Shuffled index order for one epoch.
    pub fn epoch_order(&self, rng: &mut impl Rng) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.len()).collect();
        order.shuffle(rng);
        order
    }

    /// Per-channel mean of all pixels in [0, 1] (the "dataset-mean image" attack baseline uses
    /// the per-pixel version, [`Dataset::mean_image`]).
    pub fn mean_image(&self) -> Vec<f32> {
        let n = self.image_len();
        let mut acc = vec![0f64; n];
        for i in 0..self.len() {
            for (a, &b) in acc.iter_mut().zip(&self.images[i * n..(i + 1) * n]) {
                *a += f64::from(b);
            }
        }
        let k = (self.len().max(1) as f64) * 255.0;
        acc.into_iter().map(|a| (a / k) as f32).collect()
    }

    /// Converts to `channels` and resizes to `size` (no-op when already matching).
    pub fn conform(self, channels: usize, size: usize) -> Result<Dataset> {
        if self.channels == channels && self.size == size {
            return Ok(self);
        }
        if !(self.channels == channels || self.channels == 1 || channels == 1) {
            return Err(MjpError::Config(format!(
                "dataset {} has {} channels; the model wants {channels}",
                self.name, self.channels
            )));
        }
        let n = self.image_len();
        let mut images = Vec::with_capacity(self.len() * channels * size * size);
        for i in 0..self.len() {
            let chw = &self.images[i * n..(i + 1) * n];
            images.extend(convert_image(chw, self.channels, self.size, channels, size));
        }
        Ok(Dataset {
            channels,
            size,
            images,
            ..self
        })
    }
}

/// Converts one CHW byte image between channel counts and sizes (bilinear).
fn convert_image(chw: &[u8], c_in: usize, s_in: usize, c_out: usize, s_out: usize) -> Vec<u8> {
    let plane = s_in * s_in;
    let rgb = image::RgbImage::from_fn(s_in as u32, s_in as u32, |x, y| {
        let at = |c: usize| chw[c.min(c_in - 1) * plane + y as usize * s_in + x as usize];
        image::Rgb([at(0), at(1), at(2)])
    });
    let resized = if s_in == s_out {
        rgb
    } else {
        image::imageops::resize(
            &rgb,
            s_out as u32,
            s_out as u32,
            image::imageops::FilterType::Triangle,
        )
    };
    chw_from_rgb(&resized, c_out)
}

fn chw_from_rgb(rgb: &image::RgbImage, channels: usize) -> Vec<u8> {
    let s = rgb.width() as usize;
    let mut out = vec![0u8; channels * s * s];
    for (x, y, p) in rgb.enumerate_pixels() {
        let i = y as usize * s + x as usize;
        if channels == 1 {
            let l = 0.299 * f32::from(p[0]) + 0.587 * f32::from(p[1]) + 0.114 * f32::from(p[2]);
            out[i] = l.round().clamp(0.0, 255.0) as u8;
        } else {
            for c in 0..3 {
                out[c * s * s + i] = p[c];
            }
        }
    }
    out
}

/// Reads one PNG/JPEG file as CHW bytes with `channels` channels, resized to `size` x `size`.
pub fn load_image(path: &Path, channels: usize, size: usize) -> Result<Vec<u8>> {
    let img =
        image::open(path).map_err(|e| MjpError::data(path, format!("cannot decode image: {e}")))?;
    let rgb = img.to_rgb8();
    let rgb = if rgb.width() as usize == size && rgb.height() as usize == size {
        rgb
    } else {
        image::imageops::resize(
            &rgb,
            size as u32,
            size as u32,
            image::imageops::FilterType::Triangle,
        )
    };
    Ok(chw_from_rgb(&rgb, channels))
}

fn read_maybe_gz(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path).map_err(|e| MjpError::io(path, e))?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(|e| MjpError::data(path, format!("corrupt gzip stream: {e}")))?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// Finds `<stem>` or `<stem>.gz` in `dir`.
fn find_file(dir: &Path, stems: &[&str]) -> Result<PathBuf> {
    for stem in stems {
        for candidate in [dir.join(stem), dir.join(format!("{stem}.gz"))] {
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    Err(MjpError::data(
        dir.join(stems[0]),
        "not found (with or without .gz); run scripts/fetch-data.sh or point --data at the directory",
    ))
}

/// Parses an IDX file: returns the dimensions and the payload (u8 only).
pub fn parse_idx(bytes: &[u8], path: &Path, expected_dims: usize) -> Result<(Vec<usize>, Vec<u8>)> {
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 {
        return Err(MjpError::data(path, "not an IDX file (bad magic number)"));
    }
    if bytes[2] != 0x08 {
        return Err(MjpError::data(
            path,
            format!("IDX element type 0x{:02x} is not unsigned byte", bytes[2]),
        ));
    }
    let ndim = usize::from(bytes[3]);
    if ndim != expected_dims {
        return Err(MjpError::data(
            path,
            format!("IDX has {ndim} dimensions, expected {expected_dims}"),
        ));
    }
    let header = 4 + 4 * ndim;
    if bytes.len() < header {
        return Err(MjpError::data(path, "truncated IDX header"));
    }
    let dims: Vec<usize> = (0..ndim)
        .map(|i| {
            u32::from_be_bytes(bytes[4 + 4 * i..8 + 4 * i].try_into().expect("4 bytes")) as usize
        })
        .collect();
    let expected = dims.iter().product::<usize>();
    let payload = &bytes[header..];
    if payload.len() != expected {
        return Err(MjpError::data(
            path,
            format!(
                "IDX dimensions {dims:?} need {expected} bytes of data, file has {}",
                payload.len()
            ),
        ));
    }
    Ok((dims, payload.to_vec()))
}

/// The IDX file-name prefix of a split.
fn idx_prefix(split: Split) -> &'static str {
    match split {
        Split::Train => "train",
        Split::Test => "t10k",
    }
}

/// The label file of an IDX split and its labels (checked to be 0..=9).
fn idx_labels(dir: &Path, split: Split) -> Result<(PathBuf, Vec<u32>)> {
    let prefix = idx_prefix(split);
    let label_path = find_file(
        dir,
        &[
            &format!("{prefix}-labels-idx1-ubyte"),
            &format!("{prefix}-labels.idx1-ubyte"),
        ],
    )?;
    let (_, labels) = parse_idx(&read_maybe_gz(&label_path)?, &label_path, 1)?;
    if let Some(bad) = labels.iter().find(|&&l| l > 9) {
        return Err(MjpError::data(
            &label_path,
            format!("label {bad} outside 0..=9"),
        ));
    }
    Ok((label_path, labels.into_iter().map(u32::from).collect()))
}

fn load_idx(dir: &Path, split: Split, name: &str) -> Result<Dataset> {
    let prefix = idx_prefix(split);
    let image_path = find_file(
        dir,
        &[
            &format!("{prefix}-images-idx3-ubyte"),
            &format!("{prefix}-images.idx3-ubyte"),
        ],
    )?;
    let (dims, images) = parse_idx(&read_maybe_gz(&image_path)?, &image_path, 3)?;
    let (label_path, labels) = idx_labels(dir, split)?;
    if dims[1] != dims[2] {
        return Err(MjpError::data(
            &image_path,
            format!(
                "images are {}x{}; only square images are supported",
                dims[1], dims[2]
            ),
        ));
    }
    if labels.len() != dims[0] {
        return Err(MjpError::data(
            &label_path,
            format!(
                "{} labels for {} images in {}",
                labels.len(),
                dims[0],
                image_path.display()
            ),
        ));
    }
    Ok(Dataset {
        name: name.to_string(),
        channels: 1,
        size: dims[1],
        num_classes: 10,
        images,
        labels,
    })
}

fn load_cifar(dir: &Path, split: Split, hundred: bool) -> Result<Dataset> {
    let sub = if hundred {
        "cifar-100-binary"
    } else {
        "cifar-10-batches-bin"
    };
    let dir = if dir.join(sub).is_dir() {
        dir.join(sub)
    } else {
        dir.to_path_buf()
    };
    let files: Vec<PathBuf> = match (hundred, split) {
        (false, Split::Train) => (1..=5)
            .map(|i| dir.join(format!("data_batch_{i}.bin")))
            .collect(),
        (false, Split::Test) => vec![dir.join("test_batch.bin")],
        (true, Split::Train) => vec![dir.join("train.bin")],
        (true, Split::Test) => vec![dir.join("test.bin")],
    };
    let label_bytes = if hundred { 2 } else { 1 };
    let record = label_bytes + 3072;
    let mut images = Vec::new();
    let mut labels = Vec::new();
    for file in &files {
        let bytes = std::fs::read(file).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                MjpError::data(file, "not found: CIFAR binary batches are not downloadable here; copy them in (see README, Data)")
            } else {
                MjpError::io(file, e)
            }
        })?;
        if bytes.is_empty() || bytes.len() % record != 0 {
            return Err(MjpError::data(
                file,
                format!(
                    "{} bytes is not a whole number of {record}-byte CIFAR records",
                    bytes.len()
                ),
            ));
        }
        for rec in bytes.chunks_exact(record) {
            let label = u32::from(rec[label_bytes - 1]);
            let classes = if hundred { 100 } else { 10 };
            if label >= classes {
                return Err(MjpError::data(
                    file,
                    format!("label {label} outside 0..{classes}"),
                ));
            }
            labels.push(label);
            images.extend_from_slice(&rec[label_bytes..]);
        }
    }
    Ok(Dataset {
        name: if hundred { "cifar100" } else { "cifar10" }.into(),
        channels: 3,
        size: 32,
        num_classes: if hundred { 100 } else { 10 },
        images,
        labels,
    })
}

fn load_folder(dir: &Path, split: Split) -> Result<Dataset> {
    let split_dir = dir.join(match split {
        Split::Train => "train",
        Split::Test => "test",
    });
    let root = if split_dir.is_dir() {
        split_dir
    } else {
        dir.to_path_buf()
    };
    let read_dir = |d: &Path| -> Result<Vec<PathBuf>> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(d)
            .map_err(|e| MjpError::io(d, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        v.sort();
        Ok(v)
    };
    let class_dirs: Vec<PathBuf> = read_dir(&root)?
        .into_iter()
        .filter(|p| p.is_dir())
        .collect();
    if class_dirs.is_empty() {
        return Err(MjpError::data(
            &root,
            "no class directories (expected <dir>/<class>/*.png|jpg)",
        ));
    }
    let names: Vec<String> = class_dirs
        .iter()
        .map(|p| {
            p.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        })
        .collect();
    // Integer class names are taken as labels (CIFAR-style "3/"), others by sorted order.
    let numeric: Option<Vec<u32>> = names.iter().map(|n| n.parse().ok()).collect();
    let label_of = |i: usize| numeric.as_ref().map_or(i as u32, |v| v[i]);
    let num_classes = numeric.as_ref().map_or(names.len(), |v| {
        v.iter().max().map_or(0, |m| *m as usize + 1)
    });
    let mut decoded: Vec<(image::DynamicImage, u32)> = Vec::new();
    for (ci, cdir) in class_dirs.iter().enumerate() {
        for file in read_dir(cdir)? {
            let ext = file
                .extension()
                .map(|e| e.to_string_lossy().to_lowercase())
                .unwrap_or_default();
            if !matches!(ext.as_str(), "png" | "jpg" | "jpeg") {
                continue;
            }
            let img = image::open(&file)
                .map_err(|e| MjpError::data(&file, format!("cannot decode image: {e}")))?;
            decoded.push((img, label_of(ci)));
        }
    }
    let Some((first, _)) = decoded.first() else {
        return Err(MjpError::data(&root, "no PNG/JPEG images found"));
    };
    let size = first.width().min(first.height()) as usize;
    let grey = decoded.iter().all(|(img, _)| {
        matches!(
            img.color(),
            image::ColorType::L8 | image::ColorType::L16 | image::ColorType::La8
        )
    });
    let channels = if grey { 1 } else { 3 };
    let mut images = Vec::with_capacity(decoded.len() * channels * size * size);
    let mut labels = Vec::with_capacity(decoded.len());
    for (img, label) in decoded {
        let rgb = img.to_rgb8();
        let rgb = if rgb.width() as usize == size && rgb.height() as usize == size {
            rgb
        } else {
            image::imageops::resize(
                &rgb,
                size as u32,
                size as u32,
                image::imageops::FilterType::Triangle,
            )
        };
        images.extend(chw_from_rgb(&rgb, channels));
        labels.push(label);
    }
    Ok(Dataset {
        name: root.display().to_string(),
        channels,
        size,
        num_classes: num_classes.max(2),
        images,
        labels,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idx_bytes(dims: &[u32], payload: &[u8]) -> Vec<u8> {
        let mut v = vec![0, 0, 0x08, dims.len() as u8];
        for d in dims {
            v.extend(d.to_be_bytes());
        }
        v.extend(payload);
        v
    }

    #[test]
    fn idx_round_trip_and_errors() {
        let p = Path::new("x");
        let (dims, data) =
            parse_idx(&idx_bytes(&[2, 2, 2], &[1, 2, 3, 4, 5, 6, 7, 8]), p, 3).unwrap();
        assert_eq!(dims, vec![2, 2, 2]);
        assert_eq!(data.len(), 8);
        let err = parse_idx(&idx_bytes(&[2, 2, 2], &[1, 2, 3]), p, 3)
            .unwrap_err()
            .to_string();
        assert!(err.contains("need 8 bytes"), "{err}");
        assert!(
            parse_idx(b"PK\x03\x04", p, 3)
                .unwrap_err()
                .to_string()
                .contains("magic")
        );
        assert!(
            parse_idx(&idx_bytes(&[2], &[1, 2]), p, 3)
                .unwrap_err()
                .to_string()
                .contains("dimensions")
        );
    }

    #[test]
    fn missing_files_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let err = DataSource::Idx(dir.path().to_path_buf())
            .load(Split::Train, dir.path())
            .unwrap_err()
            .to_string();
        assert!(err.contains("train-images-idx3-ubyte"), "{err}");
        let err = DataSource::Cifar10(dir.path().to_path_buf())
            .load(Split::Test, dir.path())
            .unwrap_err()
            .to_string();
        assert!(err.contains("test_batch.bin"), "{err}");
    }

    #[test]
    fn cifar_records_parse() {
        let dir = tempfile::tempdir().unwrap();
        let mut rec = vec![7u8];
        rec.extend((0..3072).map(|i| (i % 251) as u8));
        std::fs::write(
            dir.path().join("test_batch.bin"),
            [rec.clone(), rec].concat(),
        )
        .unwrap();
        let ds = DataSource::Cifar10(dir.path().into())
            .load(Split::Test, dir.path())
            .unwrap();
        assert_eq!(ds.len(), 2);
        assert_eq!(ds.labels, vec![7, 7]);
        assert_eq!(ds.image_len(), 3072);
        std::fs::write(dir.path().join("test_batch.bin"), [1u8; 100]).unwrap();
        assert!(
            DataSource::Cifar10(dir.path().into())
                .load(Split::Test, dir.path())
                .is_err()
        );
    }

    #[test]
    fn augmentation_keeps_shape_and_flip_mirrors() {
        let ds = Dataset {
            name: "t".into(),
            channels: 1,
            size: 2,
            num_classes: 2,
            images: vec![0, 255, 0, 255],
            labels: vec![1],
        };
        let mut rng = crate::seed::Seed(3).rng();
        for _ in 0..20 {
            let (px, _) = ds.batch(
                &[0],
                Augment {
                    crop_padding: 0,
                    hflip: true,
                },
                &mut rng,
            );
            assert!(px == vec![0.0, 1.0, 0.0, 1.0] || px == vec![1.0, 0.0, 1.0, 0.0]);
        }
    }

    #[test]
    fn source_strings_round_trip() {
        for s in [
            "fashion-mnist",
            "mnist",
            "idx:/a/b",
            "cifar10:c",
            "cifar100:d",
            "folder:e",
        ] {
            assert_eq!(s.parse::<DataSource>().unwrap().to_string(), s);
        }
        assert!("imagenet".parse::<DataSource>().is_err());
    }
}
