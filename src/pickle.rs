//! A safe reader for PyTorch `torch.save` zip files.
//!
//! The pickle inside (`{archive}/data.pkl`) is run on a small stack machine of our own that
//! never executes or imports anything: classes stay names ([`Value::Global`]) and calls stay
//! data ([`Value::Reduce`], [`Value::Build`]). Only two calls are interpreted:
//! `torch._utils._rebuild_tensor_v2` (and `_rebuild_parameter` around it) becomes a
//! [`Value::Tensor`], and `collections.OrderedDict()` becomes a [`Value::Dict`].
//!
//! Malformed input of any kind gives an error that names the file; the parser never panics.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use anyhow::{anyhow, bail, Result};

/// Most nested levels a value may have when the parse result is built.
const MAX_DEPTH: usize = 256;
/// Most objects a pickle may create while it is parsed, and most values its result may expand
/// to (shared references converted once per use): a "billion laughs" pickle of a few hundred
/// bytes, or megabytes of NONE opcodes, stop here with an error instead of exhausting memory.
/// A transcoder checkpoint holds a few hundred.
const MAX_NODES: usize = 2_000_000;
/// Largest `data.pkl` accepted.
const MAX_PICKLE_BYTES: u64 = 1 << 30;

/// Element type of a torch storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    /// `torch.FloatStorage`
    F32,
    /// `torch.HalfStorage`
    F16,
    /// `torch.BFloat16Storage`
    BF16,
    /// `torch.DoubleStorage`
    F64,
    /// `torch.LongStorage`
    I64,
    /// `torch.IntStorage`
    I32,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F16 | DType::BF16 => 2,
            DType::F32 | DType::I32 => 4,
            DType::F64 | DType::I64 => 8,
        }
    }

    /// The dtype for a torch storage class name such as `FloatStorage`.
    pub fn from_storage_name(name: &str) -> Option<Self> {
        Some(match name {
            "FloatStorage" => DType::F32,
            "HalfStorage" => DType::F16,
            "BFloat16Storage" => DType::BF16,
            "DoubleStorage" => DType::F64,
            "LongStorage" => DType::I64,
            "IntStorage" => DType::I32,
            _ => return None,
        })
    }
}

/// A tensor found in the pickle: where its data lives and how to view it.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorRef {
    /// Storage key: the data is the zip entry `{archive}/data/{storage_key}`.
    pub storage_key: String,
    /// Element type of the storage.
    pub dtype: DType,
    /// Offset of the first element in the storage, in elements.
    pub offset: usize,
    /// Tensor shape.
    pub shape: Vec<usize>,
    /// Tensor strides, in elements.
    pub stride: Vec<usize>,
}

impl TensorRef {
    /// Number of elements (1 for a scalar).
    pub fn numel(&self) -> Result<usize> {
        self.shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| anyhow!("tensor shape {:?} overflows", self.shape))
    }

    /// Whether the strides describe a C-contiguous (row-major) layout.
    pub fn is_contiguous(&self) -> bool {
        if self.shape.len() != self.stride.len() {
            return false;
        }
        let mut expected = 1usize;
        for (&d, &s) in self.shape.iter().zip(&self.stride).rev() {
            if d > 1 && s != expected {
                return false;
            }
            expected = match expected.checked_mul(d) {
                Some(e) => e,
                None => return false,
            };
        }
        true
    }
}

/// A value in the pickle tree. Nothing is ever resolved or executed.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// Python `None`.
    None,
    /// Python `bool`.
    Bool(bool),
    /// Python `int` (must fit in i64).
    Int(i64),
    /// Python `float`.
    Float(f64),
    /// Python `str`.
    Str(String),
    /// Python `tuple`.
    Tuple(Vec<Value>),
    /// Python `list`.
    List(Vec<Value>),
    /// Python `dict` (or `OrderedDict`), in insertion order.
    Dict(Vec<(Value, Value)>),
    /// A global name such as `torch.float32` or a class; never imported.
    Global {
        /// Module path, e.g. `torch`.
        module: String,
        /// Attribute name, e.g. `float32`.
        name: String,
    },
    /// A call `callable(*args)` (REDUCE) or `cls.__new__(cls, *args)` (NEWOBJ), not performed.
    Reduce {
        /// What would be called.
        callable: Box<Value>,
        /// The argument tuple.
        args: Box<Value>,
    },
    /// `obj.__setstate__(state)` (BUILD), not performed. A dataclass instance looks like
    /// `Build{obj: Reduce{Global cls, ()}, state: Dict{fields}}`.
    Build {
        /// The object being built.
        obj: Box<Value>,
        /// Its state (usually the instance dict).
        state: Box<Value>,
    },
    /// A persistent id (BINPERSID) that is not part of a recognised tensor.
    PersistentId(Box<Value>),
    /// A tensor from `torch._utils._rebuild_tensor_v2`.
    Tensor(TensorRef),
}

impl Value {
    /// Looks up a string key in a dict, or in the state dict of a [`Value::Build`].
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Dict(items) => items.iter().find_map(|(k, v)| match k {
                Value::Str(s) if s == key => Some(v),
                _ => None,
            }),
            Value::Build { state, .. } => state.get(key),
            _ => None,
        }
    }

    /// The string, if this is a `str`.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The integer, if this is an `int` (bools are not ints here).
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            _ => None,
        }
    }

    /// The number as f64, if this is a `float` or an `int`.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Float(f) => Some(*f),
            Value::Int(i) => Some(*i as f64),
            _ => None,
        }
    }

    /// The bool, if this is a `bool`.
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }

    /// The items, if this is a dict.
    pub fn as_dict(&self) -> Option<&[(Value, Value)]> {
        match self {
            Value::Dict(items) => Some(items),
            _ => None,
        }
    }

    /// The tensor reference, if this is a tensor.
    pub fn as_tensor(&self) -> Option<&TensorRef> {
        match self {
            Value::Tensor(t) => Some(t),
            _ => None,
        }
    }

    /// Converts plain data (None, bool, int, float, str, lists, tuples, string-keyed dicts) to
    /// JSON; globals become `"module.name"`; anything else gives `None`.
    pub fn to_json(&self) -> Option<serde_json::Value> {
        use serde_json::Value as J;
        Some(match self {
            Value::None => J::Null,
            Value::Bool(b) => J::Bool(*b),
            Value::Int(i) => J::from(*i),
            Value::Float(f) => J::from(serde_json::Number::from_f64(*f)?),
            Value::Str(s) => J::String(s.clone()),
            Value::Tuple(v) | Value::List(v) => {
                J::Array(v.iter().map(|x| x.to_json()).collect::<Option<_>>()?)
            }
            Value::Dict(items) => {
                let mut m = serde_json::Map::new();
                for (k, v) in items {
                    m.insert(k.as_str()?.to_string(), v.to_json()?);
                }
                J::Object(m)
            }
            Value::Global { module, name } => J::String(format!("{module}.{name}")),
            _ => return None,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// The stack machine. During parsing every object is a shared, mutable node so that the memo
// refers to the same object as the stack (as in Python): a dict memoised when empty and filled
// later is seen filled through BINGET.

type Node = Rc<RefCell<Obj>>;

#[derive(Clone)]
enum Obj {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Tuple(Vec<Node>),
    List(Vec<Node>),
    Dict(Vec<(Node, Node)>),
    Global { module: String, name: String },
    Reduce { callable: Node, args: Node },
    Build { obj: Node, state: Node },
    PersId(Node),
}

fn node(o: Obj) -> Node {
    Rc::new(RefCell::new(o))
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Node>,
    metastack: Vec<Vec<Node>>,
    memo: HashMap<u32, Node>,
    /// Every node ever created, so they can be emptied one by one at the end: dropping a deeply
    /// nested or cyclic graph through `Rc` would otherwise recurse (or leak).
    arena: Vec<Node>,
}

impl Drop for Machine<'_> {
    fn drop(&mut self) {
        for n in &self.arena {
            if let Ok(mut o) = n.try_borrow_mut() {
                *o = Obj::None;
            }
        }
    }
}

impl<'a> Machine<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len());
        match end {
            Some(end) => {
                let s = &self.data[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => bail!("truncated pickle: need {n} bytes at byte {}", self.pos),
        }
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn line(&mut self) -> Result<String> {
        let rest = &self.data[self.pos.min(self.data.len())..];
        let n = rest
            .iter()
            .take(4096)
            .position(|&c| c == b'\n')
            .ok_or_else(|| anyhow!("unterminated GLOBAL name at byte {}", self.pos))?;
        let s = std::str::from_utf8(&rest[..n])
            .map_err(|_| anyhow!("GLOBAL name is not UTF-8 at byte {}", self.pos))?
            .to_string();
        self.pos += n + 1;
        Ok(s)
    }

    fn string(&mut self, n: usize) -> Result<String> {
        let at = self.pos;
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| anyhow!("string is not UTF-8 at byte {at}"))
    }

    fn new_node(&mut self, o: Obj) -> Result<Node> {
        if self.arena.len() >= MAX_NODES {
            bail!("pickle creates more than {MAX_NODES} objects (at byte {})", self.pos);
        }
        let n = node(o);
        self.arena.push(n.clone());
        Ok(n)
    }

    fn push(&mut self, o: Obj) -> Result<()> {
        let n = self.new_node(o)?;
        self.stack.push(n);
        Ok(())
    }

    fn pop(&mut self) -> Result<Node> {
        self.stack.pop().ok_or_else(|| anyhow!("pickle stack underflow at byte {}", self.pos))
    }

    fn top(&self) -> Result<Node> {
        self.stack
            .last()
            .cloned()
            .ok_or_else(|| anyhow!("pickle stack underflow at byte {}", self.pos))
    }

    fn pop_mark(&mut self) -> Result<Vec<Node>> {
        let below = self
            .metastack
            .pop()
            .ok_or_else(|| anyhow!("no MARK on the pickle stack at byte {}", self.pos))?;
        Ok(std::mem::replace(&mut self.stack, below))
    }

    fn memo_put(&mut self, idx: u32) -> Result<()> {
        let top = self.top()?;
        self.memo.insert(idx, top);
        Ok(())
    }

    fn memo_get(&mut self, idx: u32) -> Result<()> {
        let n = self
            .memo
            .get(&idx)
            .cloned()
            .ok_or_else(|| anyhow!("memo key {idx} not found at byte {}", self.pos))?;
        self.stack.push(n);
        Ok(())
    }

    fn set_items(&mut self, target: &Node, items: Vec<Node>) -> Result<()> {
        if !items.len().is_multiple_of(2) {
            bail!("odd number of items for SETITEMS at byte {}", self.pos);
        }
        let mut t = target
            .try_borrow_mut()
            .map_err(|_| anyhow!("recursive SETITEM at byte {}", self.pos))?;
        let Obj::Dict(d) = &mut *t else {
            bail!("SETITEM on a non-dict at byte {}", self.pos);
        };
        let mut it = items.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            d.push((k, v));
        }
        Ok(())
    }

    fn append(&mut self, target: &Node, items: Vec<Node>) -> Result<()> {
        let mut t = target
            .try_borrow_mut()
            .map_err(|_| anyhow!("recursive APPEND at byte {}", self.pos))?;
        let Obj::List(l) = &mut *t else {
            bail!("APPEND on a non-list at byte {}", self.pos);
        };
        l.extend(items);
        Ok(())
    }

    fn run(&mut self) -> Result<Node> {
        loop {
            let at = self.pos;
            let op = self.u8().map_err(|_| anyhow!("pickle ends without STOP at byte {at}"))?;
            match op {
                0x80 => {
                    // PROTO
                    let p = self.u8()?;
                    if p > 5 {
                        bail!("unsupported pickle protocol {p}");
                    }
                }
                0x95 => {
                    // FRAME: the length is only a hint
                    self.take(8)?;
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.push(Obj::Global { module, name })?;
                }
                0x93 => {
                    // STACK_GLOBAL
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let o = {
                        let (mb, nb) = (module.borrow(), name.borrow());
                        match (&*mb, &*nb) {
                            (Obj::Str(m), Obj::Str(n)) => Obj::Global { module: m.clone(), name: n.clone() },
                            _ => bail!("STACK_GLOBAL needs two strings at byte {at}"),
                        }
                    };
                    self.push(o)?;
                }
                b'q' => {
                    let i = self.u8()? as u32;
                    self.memo_put(i)?;
                }
                b'r' => {
                    let i = self.u32()?;
                    self.memo_put(i)?;
                }
                0x94 => {
                    // MEMOIZE
                    let i = u32::try_from(self.memo.len())?;
                    self.memo_put(i)?;
                }
                b'h' => {
                    let i = self.u8()? as u32;
                    self.memo_get(i)?;
                }
                b'j' => {
                    let i = self.u32()?;
                    self.memo_get(i)?;
                }
                b'(' => {
                    let s = std::mem::take(&mut self.stack);
                    self.metastack.push(s);
                }
                b'}' => self.push(Obj::Dict(Vec::new()))?,
                b']' => self.push(Obj::List(Vec::new()))?,
                b')' => self.push(Obj::Tuple(Vec::new()))?,
                b't' => {
                    let items = self.pop_mark()?;
                    self.push(Obj::Tuple(items))?;
                }
                0x85 => {
                    let a = self.pop()?;
                    self.push(Obj::Tuple(vec![a]))?;
                }
                0x86 => {
                    let b = self.pop()?;
                    let a = self.pop()?;
                    self.push(Obj::Tuple(vec![a, b]))?;
                }
                0x87 => {
                    let c = self.pop()?;
                    let b = self.pop()?;
                    let a = self.pop()?;
                    self.push(Obj::Tuple(vec![a, b, c]))?;
                }
                0x81 | b'R' => {
                    // NEWOBJ (cls, args) or REDUCE (callable, args): recorded, not called.
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let is_ordered_dict = matches!(&*callable.borrow(),
                        Obj::Global { module, name } if module == "collections" && name == "OrderedDict");
                    let no_args = matches!(&*args.borrow(), Obj::Tuple(v) if v.is_empty());
                    if is_ordered_dict && no_args {
                        self.push(Obj::Dict(Vec::new()))?;
                    } else {
                        self.push(Obj::Reduce { callable, args })?;
                    }
                }
                b'b' => {
                    // BUILD: a dict's state (e.g. OrderedDict `_metadata`) holds attributes, not
                    // items, so it is dropped; anything else is wrapped in Build{obj, state}.
                    let state = self.pop()?;
                    let obj = self.top()?;
                    let is_dict = matches!(&*obj.borrow(), Obj::Dict(_));
                    if !is_dict {
                        let old = std::mem::replace(
                            &mut *obj.try_borrow_mut().map_err(|_| anyhow!("recursive BUILD at byte {at}"))?,
                            Obj::None,
                        );
                        let inner = self.new_node(old)?;
                        *obj.try_borrow_mut().map_err(|_| anyhow!("recursive BUILD at byte {at}"))? =
                            Obj::Build { obj: inner, state };
                    }
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    let s = self.string(n)?;
                    self.push(Obj::Str(s))?;
                }
                0x8c => {
                    let n = self.u8()? as usize;
                    let s = self.string(n)?;
                    self.push(Obj::Str(s))?;
                }
                b'J' => {
                    let b = self.take(4)?;
                    self.push(Obj::Int(i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64))?;
                }
                b'K' => {
                    let v = self.u8()?;
                    self.push(Obj::Int(v as i64))?;
                }
                b'M' => {
                    let v = self.u16()?;
                    self.push(Obj::Int(v as i64))?;
                }
                0x8a => {
                    // LONG1: little-endian two's complement
                    let n = self.u8()? as usize;
                    let b = self.take(n)?;
                    if n > 8 {
                        bail!("integer of {n} bytes is too large at byte {at}");
                    }
                    let mut buf = if b.last().is_some_and(|&x| x & 0x80 != 0) { [0xffu8; 8] } else { [0u8; 8] };
                    buf[..n].copy_from_slice(b);
                    self.push(Obj::Int(i64::from_le_bytes(buf)))?;
                }
                b'G' => {
                    let b = self.take(8)?;
                    let mut a = [0u8; 8];
                    a.copy_from_slice(b);
                    self.push(Obj::Float(f64::from_be_bytes(a)))?;
                }
                b'N' => self.push(Obj::None)?,
                0x88 => self.push(Obj::Bool(true))?,
                0x89 => self.push(Obj::Bool(false))?,
                b'Q' => {
                    let pid = self.pop()?;
                    self.push(Obj::PersId(pid))?;
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    let d = self.top()?;
                    self.set_items(&d, vec![k, v])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    let d = self.top()?;
                    self.set_items(&d, items)?;
                }
                b'a' => {
                    let v = self.pop()?;
                    let l = self.top()?;
                    self.append(&l, vec![v])?;
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    let l = self.top()?;
                    self.append(&l, items)?;
                }
                b'.' => return self.pop(),
                other => bail!("unsupported pickle opcode 0x{other:02x} at byte {at}"),
            }
        }
    }
}

/// Turns the parse graph into a [`Value`] tree, recognising tensors.
struct Converter {
    nodes: usize,
}

impl Converter {
    fn convert(&mut self, n: &Node, depth: usize) -> Result<Value> {
        if depth > MAX_DEPTH {
            bail!("pickle nests deeper than {MAX_DEPTH} levels (or is self-referencing)");
        }
        self.nodes += 1;
        if self.nodes > MAX_NODES {
            bail!("pickle expands to more than {MAX_NODES} values");
        }
        let o = n.try_borrow().map_err(|_| anyhow!("pickle object is being modified"))?.clone();
        let d = depth + 1;
        Ok(match o {
            Obj::None => Value::None,
            Obj::Bool(b) => Value::Bool(b),
            Obj::Int(i) => Value::Int(i),
            Obj::Float(f) => Value::Float(f),
            Obj::Str(s) => Value::Str(s),
            Obj::Tuple(v) => Value::Tuple(self.all(&v, d)?),
            Obj::List(v) => Value::List(self.all(&v, d)?),
            Obj::Dict(items) => {
                let mut out = Vec::with_capacity(items.len());
                for (k, v) in &items {
                    out.push((self.convert(k, d)?, self.convert(v, d)?));
                }
                Value::Dict(out)
            }
            Obj::Global { module, name } => Value::Global { module, name },
            Obj::Reduce { callable, args } => {
                let callable = self.convert(&callable, d)?;
                let args = self.convert(&args, d)?;
                rebuild(callable, args)?
            }
            Obj::Build { obj, state } => {
                Value::Build { obj: Box::new(self.convert(&obj, d)?), state: Box::new(self.convert(&state, d)?) }
            }
            Obj::PersId(p) => Value::PersistentId(Box::new(self.convert(&p, d)?)),
        })
    }

    fn all(&mut self, v: &[Node], depth: usize) -> Result<Vec<Value>> {
        v.iter().map(|x| self.convert(x, depth)).collect()
    }
}

/// Interprets the few calls we understand; every other call stays a [`Value::Reduce`].
fn rebuild(callable: Value, args: Value) -> Result<Value> {
    if let Value::Global { module, name } = &callable {
        if module == "torch._utils" && name == "_rebuild_tensor_v2" {
            return Ok(Value::Tensor(tensor_from_args(&args)?));
        }
        if module == "torch._utils" && name == "_rebuild_parameter" {
            if let Value::Tuple(a) = &args {
                if let Some(t @ Value::Tensor(_)) = a.first() {
                    return Ok(t.clone());
                }
            }
            bail!("_rebuild_parameter without a tensor argument");
        }
    }
    Ok(Value::Reduce { callable: Box::new(callable), args: Box::new(args) })
}

fn usizes(v: &Value, what: &str) -> Result<Vec<usize>> {
    let Value::Tuple(items) = v else { bail!("tensor {what} is not a tuple") };
    items
        .iter()
        .map(|x| match x {
            Value::Int(i) => usize::try_from(*i).map_err(|_| anyhow!("negative tensor {what} {i}")),
            _ => Err(anyhow!("tensor {what} holds a non-integer")),
        })
        .collect()
}

/// `_rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, hooks[, metadata])`
/// where storage is the persistent id `('storage', StorageClass, key, location, numel)`.
fn tensor_from_args(args: &Value) -> Result<TensorRef> {
    let Value::Tuple(a) = args else { bail!("_rebuild_tensor_v2 arguments are not a tuple") };
    if a.len() < 4 {
        bail!("_rebuild_tensor_v2 has {} arguments, expected at least 4", a.len());
    }
    let Value::PersistentId(pid) = &a[0] else { bail!("_rebuild_tensor_v2 storage is not a persistent id") };
    let Value::Tuple(p) = &**pid else { bail!("storage persistent id is not a tuple") };
    if p.len() < 3 || p[0].as_str() != Some("storage") {
        bail!("storage persistent id is not ('storage', type, key, ...)");
    }
    let dtype = match &p[1] {
        Value::Global { module, name } if module == "torch" => DType::from_storage_name(name)
            .ok_or_else(|| anyhow!("unsupported storage type torch.{name}"))?,
        other => bail!("unsupported storage type {other:?}"),
    };
    let storage_key = match &p[2] {
        Value::Str(s) => s.clone(),
        Value::Int(i) => i.to_string(),
        _ => bail!("storage key is not a string"),
    };
    let offset = match &a[1] {
        Value::Int(i) => usize::try_from(*i).map_err(|_| anyhow!("negative storage offset {i}"))?,
        _ => bail!("storage offset is not an integer"),
    };
    let shape = usizes(&a[2], "size")?;
    let stride = usizes(&a[3], "stride")?;
    if shape.len() != stride.len() {
        bail!("tensor size {shape:?} and stride {stride:?} differ in rank");
    }
    Ok(TensorRef { storage_key, dtype, offset, shape, stride })
}

/// Parses a pickle byte string into a [`Value`] without executing anything.
pub fn parse_pickle(data: &[u8]) -> Result<Value> {
    let mut m = Machine {
        data,
        pos: 0,
        stack: Vec::new(),
        metastack: Vec::new(),
        memo: HashMap::new(),
        arena: Vec::new(),
    };
    let root = m.run()?;
    // Convert while the machine (and so every node) is alive; its Drop then empties the graph.
    Converter { nodes: 0 }.convert(&root, 0)
}

/// An opened `torch.save` zip file: the parsed object tree and access to tensor data.
pub struct Pt {
    /// The file this came from.
    pub path: PathBuf,
    /// The archive's top folder (the part before `/data.pkl`).
    pub archive: String,
    /// The unpickled top-level object.
    pub root: Value,
    zip: RefCell<zip::ZipArchive<BufReader<File>>>,
}

fn with_path<T>(path: &Path, r: Result<T>) -> Result<T> {
    r.map_err(|e| anyhow!("{}: {e:#}", path.display()))
}

/// Opens a `torch.save` zip file and parses its `data.pkl`. Errors name the file.
pub fn load_pt(path: impl AsRef<Path>) -> Result<Pt> {
    let path = path.as_ref();
    with_path(path, load_pt_inner(path))
}

fn load_pt_inner(path: &Path) -> Result<Pt> {
    let mut f = File::open(path)?;
    let mut magic = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        let n = f.read(&mut magic[got..])?;
        if n == 0 {
            break;
        }
        got += n;
    }
    if got < 4 || &magic != b"PK\x03\x04" {
        bail!(
            "not a torch.save zip archive (legacy non-zip .pt files and other formats are not supported; \
             re-save with torch.save(obj, path) from torch >= 1.6)"
        );
    }
    drop(f);
    let mut zip = zip::ZipArchive::new(BufReader::new(File::open(path)?))
        .map_err(|e| anyhow!("bad zip archive: {e}"))?;
    let pkl = zip
        .file_names()
        .filter(|n| *n == "data.pkl" || n.ends_with("/data.pkl"))
        .min_by_key(|n| n.len())
        .map(str::to_string)
        .ok_or_else(|| anyhow!("no data.pkl in the archive"))?;
    let archive = pkl.strip_suffix("data.pkl").unwrap_or("").trim_end_matches('/').to_string();
    let bytes = {
        let entry = zip.by_name(&pkl).map_err(|e| anyhow!("cannot open {pkl}: {e}"))?;
        if entry.size() > MAX_PICKLE_BYTES {
            bail!("{pkl} is too large ({} bytes)", entry.size());
        }
        let mut bytes = Vec::with_capacity(entry.size() as usize);
        entry.take(MAX_PICKLE_BYTES).read_to_end(&mut bytes).map_err(|e| anyhow!("cannot read {pkl}: {e}"))?;
        bytes
    };
    let bo_name = if archive.is_empty() { "byteorder".to_string() } else { format!("{archive}/byteorder") };
    if let Ok(entry) = zip.by_name(&bo_name) {
        let mut bo = String::new();
        entry.take(16).read_to_string(&mut bo).map_err(|e| anyhow!("cannot read {bo_name}: {e}"))?;
        if bo.trim() != "little" {
            bail!("unsupported byte order {:?} (only little-endian archives are read)", bo.trim());
        }
    }
    let root = parse_pickle(&bytes)?;
    Ok(Pt { path: path.to_path_buf(), archive, root, zip: RefCell::new(zip) })
}

impl Pt {
    /// Reads a tensor's data as f32 (converting f16/bf16/f64/ints) with its shape.
    /// Only C-contiguous tensors are supported.
    pub fn tensor(&self, t: &TensorRef) -> Result<(Vec<f32>, Vec<usize>)> {
        with_path(&self.path, self.tensor_inner(t))
    }

    fn tensor_inner(&self, t: &TensorRef) -> Result<(Vec<f32>, Vec<usize>)> {
        if !t.is_contiguous() {
            bail!("tensor with shape {:?} and stride {:?} is not contiguous", t.shape, t.stride);
        }
        let numel = t.numel()?;
        let size = t.dtype.size();
        let start = t.offset.checked_mul(size).ok_or_else(|| anyhow!("storage offset overflows"))?;
        let len = numel.checked_mul(size).ok_or_else(|| anyhow!("tensor size overflows"))?;
        let end = start.checked_add(len).ok_or_else(|| anyhow!("tensor size overflows"))?;
        let name = if self.archive.is_empty() {
            format!("data/{}", t.storage_key)
        } else {
            format!("{}/data/{}", self.archive, t.storage_key)
        };
        let mut zip = self.zip.try_borrow_mut().map_err(|_| anyhow!("archive is busy"))?;
        let mut entry = zip.by_name(&name).map_err(|e| anyhow!("cannot open storage {name}: {e}"))?;
        if (entry.size() as u128) < end as u128 {
            bail!("storage {name} has {} bytes, tensor needs bytes {start}..{end}", entry.size());
        }
        std::io::copy(&mut (&mut entry).take(start as u64), &mut std::io::sink())?;
        let mut raw = vec![0u8; len];
        entry.read_exact(&mut raw).map_err(|e| anyhow!("cannot read storage {name}: {e}"))?;
        let data: Vec<f32> = match t.dtype {
            DType::F32 => raw.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            DType::F16 => raw.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            DType::BF16 => raw.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            DType::F64 => raw
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32)
                .collect(),
            DType::I64 => raw
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32)
                .collect(),
            DType::I32 => raw.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f32).collect(),
        };
        Ok((data, t.shape.clone()))
    }

    /// Reads the tensor stored under a string key of the top-level dict (or of a nested dict
    /// found by `outer` first, e.g. `Some("state_dict")`).
    pub fn named_tensor(&self, outer: Option<&str>, key: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        let dict = match outer {
            Some(o) => self
                .root
                .get(o)
                .ok_or_else(|| anyhow!("{}: no key {o:?} at the top level", self.path.display()))?,
            None => &self.root,
        };
        let t = dict
            .get(key)
            .and_then(Value::as_tensor)
            .ok_or_else(|| anyhow!("{}: no tensor {key:?}", self.path.display()))?;
        self.tensor(t)
    }
}

/// Reads a file whose top-level object is a single tensor (e.g. `*_log_feature_sparsity.pt`).
pub fn read_bare_tensor(path: impl AsRef<Path>) -> Result<(Vec<f32>, Vec<usize>)> {
    let pt = load_pt(path)?;
    let t = pt
        .root
        .as_tensor()
        .ok_or_else(|| anyhow!("{}: top-level object is not a tensor", pt.path.display()))?;
    pt.tensor(t)
}

/// One text of a seed-notebook trace file: the text, and its steps' activation vectors.
pub type SeedTrace = (String, Vec<(i64, Vec<f32>)>);

/// Reads a seed-notebook trace file, `dict[text -> dict[step int -> float tensor [D]]]`, in
/// insertion order.
pub fn read_seed_traces(path: impl AsRef<Path>) -> Result<Vec<SeedTrace>> {
    let pt = load_pt(path)?;
    let p = pt.path.display();
    let outer = pt.root.as_dict().ok_or_else(|| anyhow!("{p}: top-level object is not a dict"))?;
    let mut out = Vec::with_capacity(outer.len());
    for (text, steps) in outer {
        let text = text.as_str().ok_or_else(|| anyhow!("{p}: a trace key is not a string"))?;
        let steps = steps.as_dict().ok_or_else(|| anyhow!("{p}: traces of {text:?} are not a dict"))?;
        let mut v = Vec::with_capacity(steps.len());
        for (step, t) in steps {
            let step = step.as_int().ok_or_else(|| anyhow!("{p}: a step key of {text:?} is not an int"))?;
            let t = t.as_tensor().ok_or_else(|| anyhow!("{p}: step {step} of {text:?} is not a tensor"))?;
            let (data, shape) = pt.tensor(t)?;
            if shape.len() != 1 {
                bail!("{p}: step {step} of {text:?} has shape {shape:?}, expected [D]");
            }
            v.push((step, data));
        }
        out.push((text.to_string(), v));
    }
    Ok(out)
}
