//! The launch tables of the CUDA penalty kernel, built on the host: one item per parameter tensor
//! (its θ and gradient addresses, its offset in the flat θ*/F buffers, its length, its first block
//! of 8-bit F's scales), numbered in tiles, split into launches of at most `max_items` items. The bytes of a table are the kernel's
//! parameter (`struct Table` in penalty.cu: keep the two layouts in step).

/// Elements per tile: threads per block × elements per thread (`EWC_TILE` in penalty.cu).
pub const TILE: u64 = 256 * 8;
/// Threads per block (`EWC_BLOCK`).
pub const BLOCK: u32 = 256;

/// One parameter tensor, as the kernel reads it (`struct Item`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Item {
    pub param: u64,
    pub grad: u64,
    pub offset: u64,
    pub len: u64,
    pub block: u64,
    pub first_tile: u32,
    pub add: u32,
}

/// The fields of `struct Table` before its items.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct Header {
    star: u64,
    fisher: u64,
    partials: u64,
    scales: u64,
    coef: f32,
    count: u32,
    tiles: u32,
    block_log2: u32,
}

/// Bytes of an item, and of the header.
const ITEM: usize = 48;
const HEADER: usize = 48;
const _: () =
    assert!(std::mem::size_of::<Item>() == ITEM && std::mem::size_of::<Header>() == HEADER);

/// A parameter tensor to run over: addresses of θ and of the gradient target, its length, its
/// offset in the flat buffers, the index of its first scale block (8-bit F; 0 otherwise), and
/// whether the gradient is added to what the target holds.
#[derive(Clone, Copy, Debug)]
pub struct Target {
    pub param: u64,
    pub grad: u64,
    pub offset: u64,
    pub len: u64,
    pub block: u64,
    pub add: bool,
}

/// One launch: its items (tiles numbered from 0) and its number of tiles.
#[derive(Debug)]
pub struct Launch {
    pub items: Vec<Item>,
    pub tiles: u32,
}

/// The launches covering `targets` (empty ones skipped), each with at most `max_items` items and
/// at most `i32::MAX` tiles; `None` if one tensor alone has more tiles than that (4·10¹²
/// elements).
pub fn launches(targets: &[Target], max_items: usize) -> Option<Vec<Launch>> {
    const MAX_TILES: u64 = i32::MAX as u64;
    let mut out: Vec<Launch> = Vec::new();
    let mut current = Launch {
        items: Vec::new(),
        tiles: 0,
    };
    for t in targets.iter().filter(|t| t.len > 0) {
        let tiles = t.len.div_ceil(TILE);
        if tiles > MAX_TILES {
            return None;
        }
        if current.items.len() == max_items || current.tiles as u64 + tiles > MAX_TILES {
            let full = std::mem::replace(
                &mut current,
                Launch {
                    items: Vec::new(),
                    tiles: 0,
                },
            );
            out.push(full);
        }
        current.items.push(Item {
            param: t.param,
            grad: t.grad,
            offset: t.offset,
            len: t.len,
            block: t.block,
            first_tile: current.tiles,
            add: t.add as u32,
        });
        current.tiles += tiles as u32;
    }
    if !current.items.is_empty() {
        out.push(current);
    }
    Some(out)
}

/// What a table points at besides its items: the flat θ* and F (or F's 8-bit codes), where its
/// partial sums go, 8-bit F's scales (0 for a dense F) and log₂ of its block size.
#[derive(Clone, Copy, Debug)]
pub struct Pointers {
    pub star: u64,
    pub fisher: u64,
    pub partials: u64,
    pub scales: u64,
    pub block_log2: u32,
}

/// The kernel parameter of one launch: header and items, zero-filled to the size of `struct
/// Table` for `max_items` items.
pub fn table_bytes(launch: &Launch, at: Pointers, coef: f32, max_items: usize) -> Vec<u8> {
    let header = Header {
        star: at.star,
        fisher: at.fisher,
        partials: at.partials,
        scales: at.scales,
        coef,
        count: launch.items.len() as u32,
        tiles: launch.tiles,
        block_log2: at.block_log2,
    };
    let mut bytes = vec![0u8; table_size(max_items)];
    // SAFETY: both types are repr(C) plain data without padding (48 bytes each, checked above);
    // the destination ranges lie inside `bytes` (items.len() <= max_items, asserted).
    assert!(launch.items.len() <= max_items);
    unsafe {
        std::ptr::copy_nonoverlapping(
            (&header as *const Header).cast::<u8>(),
            bytes.as_mut_ptr(),
            HEADER,
        );
        std::ptr::copy_nonoverlapping(
            launch.items.as_ptr().cast::<u8>(),
            bytes.as_mut_ptr().add(HEADER),
            ITEM * launch.items.len(),
        );
    }
    bytes
}

/// `sizeof(Table)` for `max_items` items.
pub fn table_size(max_items: usize) -> usize {
    HEADER + ITEM * max_items
}
