//! A restricted unpickler for `torch.save` state dicts.
//!
//! Python's pickle is a program for a stack machine that may import and call anything. Here it
//! is interpreted by a small machine that knows only the opcodes a state dict uses and a short
//! whitelist of globals, each of which it *emulates* (an OrderedDict becomes a list of pairs, a
//! `_rebuild_tensor_v2` call becomes a view record). Nothing is imported or executed; any other
//! global is rejected as soon as the pickle names it.
//!
//! Objects live in an arena and the stack holds copyable handles into it: memo references
//! share objects exactly like Python's, cycles are harmless, and dropping deeply nested
//! structures never recurses. Every size is bounded by the pickle's length or a fixed limit.

use std::collections::{BTreeMap, HashMap};

use super::strided::View;
use super::DType;

/// Bounds of the machine. A real state dict needs a few dozen stack slots and about ten objects
/// and memo entries per tensor (the official checkpoint: 820 tensors, ~10k objects).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PickleLimits {
    /// Values on the stack plus open MARKs (nesting depth is bounded by this too: the
    /// machine never recurses, so deeper nesting costs nothing else).
    pub stack: usize,
    /// Memo entries.
    pub memo: usize,
    /// Objects (strings, tuples, lists, dicts, ...) created in total.
    pub objects: usize,
}

pub(crate) const MAX_STACK: usize = 1 << 20;
pub(crate) const MAX_MEMO: usize = 1 << 20;
pub(crate) const MAX_OBJECTS: usize = 1 << 22;

impl Default for PickleLimits {
    fn default() -> Self {
        PickleLimits {
            stack: MAX_STACK,
            memo: MAX_MEMO,
            objects: MAX_OBJECTS,
        }
    }
}
const MAX_GLOBAL_LINE: usize = 256;
const MAX_TENSOR_DIMS: usize = 32;
const HIGHEST_PROTOCOL: u8 = 5;
const FORBIDDEN: &str = "checkpoint references forbidden global";

/// A storage named by a persistent id: `('storage', torch.FloatStorage, key, location, numel)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct StorageDecl {
    pub key: String,
    pub dtype: DType,
    pub numel: usize,
}

/// A tensor as `_rebuild_tensor_v2` describes it: a view into storage `storage`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct TensorDecl {
    pub storage: usize,
    pub view: View,
}

/// The tensors of a state dict, sorted by name (a repeated key keeps its last value).
#[derive(Debug)]
pub(crate) struct StateDict {
    pub storages: Vec<StorageDecl>,
    pub tensors: Vec<(String, TensorDecl)>,
}

/// Interprets `pickle` and returns its state dict: the top-level dict, or the dict under its
/// `"state_dict"` key when it has one.
pub(crate) fn load_state_dict(pickle: &[u8]) -> Result<StateDict, String> {
    load_state_dict_with(pickle, PickleLimits::default())
}

/// [`load_state_dict`] under explicit limits.
pub(crate) fn load_state_dict_with(
    pickle: &[u8],
    limits: PickleLimits,
) -> Result<StateDict, String> {
    let mut machine = Machine::new(pickle, limits);
    let root = machine.run()?;
    let tensors = machine.state_dict_entries(root)?;
    Ok(StateDict {
        storages: machine.storages,
        tensors,
    })
}

#[derive(Clone, Copy, Debug)]
enum Value {
    None,
    Bool,
    Int(i64),
    Float,
    Obj(usize),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Global {
    OrderedDict,
    RebuildTensorV2,
    RebuildTensor,
    RebuildParameter,
    StorageType(DType),
    DTypeObject(DType),
}

#[derive(Debug)]
enum Obj {
    Str(String),
    Bytes,
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    Global(Global, String),
    Storage(usize),
    Tensor(TensorDecl),
}

struct Machine<'a> {
    input: &'a [u8],
    limits: PickleLimits,
    pos: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
    objs: Vec<Obj>,
    storages: Vec<StorageDecl>,
    storage_by_key: HashMap<String, usize>,
}

impl<'a> Machine<'a> {
    fn new(input: &'a [u8], limits: PickleLimits) -> Self {
        Machine {
            input,
            limits,
            pos: 0,
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
            objs: Vec::new(),
            storages: Vec::new(),
            storage_by_key: HashMap::new(),
        }
    }

    /// Runs to STOP and returns the pickled object.
    fn run(&mut self) -> Result<Value, String> {
        loop {
            let at = self.pos;
            let op = self
                .byte()
                .map_err(|_| "pickle ends without a STOP opcode".to_string())?;
            if op == b'.' {
                return self.pop();
            }
            self.step(op).map_err(|e| {
                // A forbidden global is the message; where it sits in the pickle is not.
                if e.starts_with(FORBIDDEN) {
                    e
                } else {
                    format!("pickle opcode 0x{op:02x} at byte {at}: {e}")
                }
            })?;
            if self.stack.len() + self.marks.len() > self.limits.stack {
                return Err(format!(
                    "pickle stack deeper than the limit of {}",
                    self.limits.stack
                ));
            }
        }
    }

    fn step(&mut self, op: u8) -> Result<(), String> {
        match op {
            0x80 => {
                let proto = self.byte()?;
                if proto > HIGHEST_PROTOCOL {
                    return Err(format!("unknown pickle protocol {proto}"));
                }
            }
            0x95 => {
                self.take(8)?; // FRAME: a length hint only
            }
            b'}' => self.push_obj(Obj::Dict(Vec::new()))?,
            b']' => self.push_obj(Obj::List(Vec::new()))?,
            b')' => self.push_obj(Obj::Tuple(Vec::new()))?,
            b'(' => self.marks.push(self.stack.len()),
            b't' => {
                let items = self.pop_mark()?;
                self.push_obj(Obj::Tuple(items))?;
            }
            0x85..=0x87 => {
                let n = usize::from(op - 0x84);
                let items = self.pop_n(n)?;
                self.push_obj(Obj::Tuple(items))?;
            }
            b'X' => {
                let n = self.u32()? as usize;
                self.push_str(n)?;
            }
            0x8c => {
                let n = usize::from(self.byte()?);
                self.push_str(n)?;
            }
            0x8d => {
                let n = self.u64_len()?;
                self.push_str(n)?;
            }
            // Protocol-1 byte strings: only meaningful here as text keys.
            b'U' => {
                let n = usize::from(self.byte()?);
                self.push_str(n)?;
            }
            b'T' => {
                let n = self.u32()? as usize;
                self.push_str(n)?;
            }
            b'C' => {
                let n = usize::from(self.byte()?);
                self.take(n)?;
                self.push_obj(Obj::Bytes)?;
            }
            b'B' => {
                let n = self.u32()? as usize;
                self.take(n)?;
                self.push_obj(Obj::Bytes)?;
            }
            0x8e => {
                let n = self.u64_len()?;
                self.take(n)?;
                self.push_obj(Obj::Bytes)?;
            }
            b'J' => {
                let b = self.take(4)?;
                let v = i32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                self.stack.push(Value::Int(i64::from(v)));
            }
            b'K' => {
                let v = self.byte()?;
                self.stack.push(Value::Int(i64::from(v)));
            }
            b'M' => {
                let b = self.take(2)?;
                self.stack
                    .push(Value::Int(i64::from(u16::from_le_bytes([b[0], b[1]]))));
            }
            0x8a => {
                let n = usize::from(self.byte()?);
                let v = self.long(n)?;
                self.stack.push(Value::Int(v));
            }
            0x8b => {
                let n = self.u32()? as usize;
                let v = self.long(n)?;
                self.stack.push(Value::Int(v));
            }
            b'G' => {
                self.take(8)?; // the value itself is never needed
                self.stack.push(Value::Float);
            }
            0x88 | 0x89 => self.stack.push(Value::Bool),
            b'N' => self.stack.push(Value::None),
            b'q' => {
                let i = u32::from(self.byte()?);
                self.memo_put(i)?;
            }
            b'r' => {
                let i = self.u32()?;
                self.memo_put(i)?;
            }
            0x94 => {
                let i = u32::try_from(self.memo.len()).map_err(|_| "memo too large")?;
                self.memo_put(i)?;
            }
            b'h' => {
                let i = u32::from(self.byte()?);
                self.memo_get(i)?;
            }
            b'j' => {
                let i = self.u32()?;
                self.memo_get(i)?;
            }
            b'c' => {
                let module = self.line()?;
                let name = self.line()?;
                self.push_global(&module, &name)?;
            }
            0x93 => {
                let name = self.pop()?;
                let module = self.pop()?;
                let (module, name) = (
                    self.string(module)?.to_string(),
                    self.string(name)?.to_string(),
                );
                self.push_global(&module, &name)?;
            }
            b'R' => self.reduce()?,
            b'b' => self.build()?,
            b's' => {
                let value = self.pop()?;
                let key = self.pop()?;
                self.dict_on_top()?.push((key, value));
            }
            b'u' => {
                let items = self.pop_mark()?;
                if items.len() % 2 != 0 {
                    return Err("SETITEMS with an odd number of items".into());
                }
                let pairs: Vec<(Value, Value)> =
                    items.chunks_exact(2).map(|p| (p[0], p[1])).collect();
                self.dict_on_top()?.extend(pairs);
            }
            b'a' => {
                let value = self.pop()?;
                self.list_on_top()?.push(value);
            }
            b'e' => {
                let items = self.pop_mark()?;
                self.list_on_top()?.extend(items);
            }
            b'Q' => {
                let pid = self.pop()?;
                let storage = self.persistent_storage(pid)?;
                self.push_obj(Obj::Storage(storage))?;
            }
            b'0' => {
                self.pop()?;
            }
            b'1' => {
                self.pop_mark()?;
            }
            b'2' => {
                let top = self.pop()?;
                self.stack.push(top);
                self.stack.push(top);
            }
            _ => return Err("opcode not supported in a state dict".into()),
        }
        Ok(())
    }

    // ---------------------------------------------------------------- input
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.input.len())
            .ok_or_else(|| format!("needs {n} more bytes but the pickle ends (truncated?)"))?;
        let bytes = &self.input[self.pos..end];
        self.pos = end;
        Ok(bytes)
    }

    fn byte(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64_len(&mut self) -> Result<usize, String> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        usize::try_from(u64::from_le_bytes(a)).map_err(|_| "length does not fit in memory".into())
    }

    /// Little-endian two's-complement integer of `n` bytes (LONG1/LONG4).
    fn long(&mut self, n: usize) -> Result<i64, String> {
        if n > 8 {
            return Err(format!("integer of {n} bytes is too large"));
        }
        let b = self.take(n)?;
        let fill = if b.last().is_some_and(|&x| x & 0x80 != 0) {
            0xff
        } else {
            0
        };
        let mut a = [fill; 8];
        a[..n].copy_from_slice(b);
        Ok(i64::from_le_bytes(a))
    }

    /// A newline-terminated line (GLOBAL's module and name).
    fn line(&mut self) -> Result<String, String> {
        let rest = &self.input[self.pos..];
        let len = rest
            .iter()
            .take(MAX_GLOBAL_LINE + 1)
            .position(|&b| b == b'\n')
            .ok_or("GLOBAL name is unterminated or too long")?;
        let text = std::str::from_utf8(&rest[..len]).map_err(|_| "GLOBAL name is not UTF-8")?;
        self.pos += len + 1;
        Ok(text.to_string())
    }

    // ---------------------------------------------------------------- stack
    fn push_obj(&mut self, obj: Obj) -> Result<(), String> {
        if self.objs.len() >= self.limits.objects {
            return Err(format!(
                "pickle creates more than the limit of {} objects",
                self.limits.objects
            ));
        }
        self.objs.push(obj);
        self.stack.push(Value::Obj(self.objs.len() - 1));
        Ok(())
    }

    fn push_str(&mut self, n: usize) -> Result<(), String> {
        let bytes = self.take(n)?;
        let s = std::str::from_utf8(bytes).map_err(|_| "string is not UTF-8")?;
        self.push_obj(Obj::Str(s.to_string()))
    }

    /// Pops one value; never reaches below the innermost MARK.
    fn pop(&mut self) -> Result<Value, String> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err("pops from an empty stack".into());
        }
        self.stack
            .pop()
            .ok_or_else(|| "pops from an empty stack".into())
    }

    fn pop_n(&mut self, n: usize) -> Result<Vec<Value>, String> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() < floor + n {
            return Err(format!("needs {n} values on the stack"));
        }
        Ok(self.stack.split_off(self.stack.len() - n))
    }

    fn pop_mark(&mut self) -> Result<Vec<Value>, String> {
        let mark = self.marks.pop().ok_or("no MARK on the stack")?;
        if mark > self.stack.len() {
            return Err("MARK above the stack top".into());
        }
        Ok(self.stack.split_off(mark))
    }

    fn memo_put(&mut self, index: u32) -> Result<(), String> {
        let top = *self.stack.last().ok_or("memoizes from an empty stack")?;
        if self.memo.len() >= self.limits.memo && !self.memo.contains_key(&index) {
            return Err(format!(
                "pickle memo larger than the limit of {} entries",
                self.limits.memo
            ));
        }
        self.memo.insert(index, top);
        Ok(())
    }

    fn memo_get(&mut self, index: u32) -> Result<(), String> {
        let v = *self
            .memo
            .get(&index)
            .ok_or_else(|| format!("memo entry {index} was never stored"))?;
        self.stack.push(v);
        Ok(())
    }

    // ---------------------------------------------------------------- objects
    fn obj(&self, v: Value) -> Option<&Obj> {
        match v {
            Value::Obj(i) => self.objs.get(i),
            _ => None,
        }
    }

    fn string(&self, v: Value) -> Result<&str, String> {
        match self.obj(v) {
            Some(Obj::Str(s)) => Ok(s),
            _ => Err(format!("expected a string, found {}", self.kind(v))),
        }
    }

    fn int(&self, v: Value, what: &str) -> Result<usize, String> {
        match v {
            Value::Int(i) => {
                usize::try_from(i).map_err(|_| format!("{what} is negative or too large ({i})"))
            }
            _ => Err(format!("{what} is {}, not an integer", self.kind(v))),
        }
    }

    fn int_sequence(&self, v: Value, what: &str) -> Result<Vec<usize>, String> {
        let items = match self.obj(v) {
            Some(Obj::Tuple(items)) | Some(Obj::List(items)) => items,
            _ => return Err(format!("{what} is {}, not a tuple", self.kind(v))),
        };
        if items.len() > MAX_TENSOR_DIMS {
            return Err(format!(
                "{what} has {} dims (at most {MAX_TENSOR_DIMS})",
                items.len()
            ));
        }
        items.iter().map(|&x| self.int(x, what)).collect()
    }

    fn kind(&self, v: Value) -> &'static str {
        match v {
            Value::None => "None",
            Value::Bool => "a bool",
            Value::Int(_) => "an integer",
            Value::Float => "a float",
            Value::Obj(_) => match self.obj(v) {
                Some(Obj::Str(_)) => "a string",
                Some(Obj::Bytes) => "bytes",
                Some(Obj::Tuple(_)) => "a tuple",
                Some(Obj::List(_)) => "a list",
                Some(Obj::Dict(_)) => "a dict",
                Some(Obj::Global(..)) => "a class or function",
                Some(Obj::Storage(_)) => "a storage",
                Some(Obj::Tensor(_)) => "a tensor",
                None => "an invalid object",
            },
        }
    }

    fn top_obj_mut(&mut self) -> Option<&mut Obj> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return None;
        }
        match self.stack.last() {
            Some(&Value::Obj(i)) => self.objs.get_mut(i),
            _ => None,
        }
    }

    fn dict_on_top(&mut self) -> Result<&mut Vec<(Value, Value)>, String> {
        match self.top_obj_mut() {
            Some(Obj::Dict(pairs)) => Ok(pairs),
            _ => Err("sets an item on something that is not a dict".into()),
        }
    }

    fn list_on_top(&mut self) -> Result<&mut Vec<Value>, String> {
        match self.top_obj_mut() {
            Some(Obj::List(items)) => Ok(items),
            _ => Err("appends to something that is not a list".into()),
        }
    }

    // ---------------------------------------------------------------- globals and calls
    fn push_global(&mut self, module: &str, name: &str) -> Result<(), String> {
        let global = allowed_global(module, name).ok_or_else(|| {
            format!(
                "{FORBIDDEN} `{}.{}` (refusing to run code from a checkpoint)",
                module.escape_debug(),
                name.escape_debug()
            )
        })?;
        self.push_obj(Obj::Global(global, format!("{module}.{name}")))
    }

    fn reduce(&mut self) -> Result<(), String> {
        let args = self.pop()?;
        let func = self.pop()?;
        let (global, name) = match self.obj(func) {
            Some(Obj::Global(g, name)) => (*g, name.clone()),
            _ => return Err(format!("REDUCE calls {}, not a function", self.kind(func))),
        };
        // Only the first few arguments ever matter: copy those, not a (possibly huge, possibly
        // memo-shared) tuple per call.
        let (args, arg_count) = match self.obj(args) {
            Some(Obj::Tuple(items)) => (
                items.iter().take(4).copied().collect::<Vec<Value>>(),
                items.len(),
            ),
            _ => {
                return Err(format!(
                    "REDUCE arguments are {}, not a tuple",
                    self.kind(args)
                ))
            }
        };
        match global {
            Global::OrderedDict if arg_count == 0 => self.push_obj(Obj::Dict(Vec::new())),
            Global::RebuildTensorV2 | Global::RebuildTensor => {
                let tensor = self.rebuild_tensor(&args)?;
                self.push_obj(Obj::Tensor(tensor))
            }
            Global::RebuildParameter => match args.first() {
                Some(&data) if matches!(self.obj(data), Some(Obj::Tensor(_))) => {
                    self.stack.push(data);
                    Ok(())
                }
                _ => Err("_rebuild_parameter without a tensor".into()),
            },
            _ => Err(format!(
                "checkpoint calls `{}` with {} arguments, which a state dict never does",
                name.escape_debug(),
                arg_count
            )),
        }
    }

    /// `_rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, hooks[, meta])`;
    /// the trailing arguments carry no data and are ignored.
    fn rebuild_tensor(&self, args: &[Value]) -> Result<TensorDecl, String> {
        if args.len() < 4 {
            return Err(format!(
                "tensor rebuilt from {} arguments (needs 4)",
                args.len()
            ));
        }
        let storage = match self.obj(args[0]) {
            Some(Obj::Storage(i)) => *i,
            _ => {
                return Err(format!(
                    "tensor built on {}, not a storage",
                    self.kind(args[0])
                ))
            }
        };
        let offset = self.int(args[1], "storage offset")?;
        let shape = self.int_sequence(args[2], "tensor size")?;
        let stride = self.int_sequence(args[3], "tensor stride")?;
        if shape.len() != stride.len() {
            return Err(format!(
                "tensor has {} sizes but {} strides",
                shape.len(),
                stride.len()
            ));
        }
        Ok(TensorDecl {
            storage,
            view: View {
                offset,
                shape,
                stride,
            },
        })
    }

    /// BUILD sets an object's state; for the dicts and tensors of a state dict that state is
    /// bookkeeping (`_metadata`, tensor flags), so it is dropped.
    fn build(&mut self) -> Result<(), String> {
        let _state = self.pop()?;
        match self.top_obj_mut() {
            Some(Obj::Dict(_)) | Some(Obj::Tensor(_)) => Ok(()),
            _ => Err("BUILD on an object that is not a dict or tensor".into()),
        }
    }

    /// `('storage', torch.FloatStorage, key, location, numel)`.
    fn persistent_storage(&mut self, pid: Value) -> Result<usize, String> {
        let items = match self.obj(pid) {
            Some(Obj::Tuple(items)) if items.len() == 5 => items.clone(),
            _ => {
                return Err(format!(
                    "persistent id is {}, not a 5-tuple",
                    self.kind(pid)
                ))
            }
        };
        if self.string(items[0])? != "storage" {
            return Err("persistent id is not a storage".into());
        }
        let dtype = match self.obj(items[1]) {
            Some(Obj::Global(Global::StorageType(d), _)) => *d,
            _ => return Err("persistent id has no storage type".into()),
        };
        let key = self.string(items[2])?.to_string();
        self.string(items[3])?; // location, e.g. "cpu" or "cuda:0": loaded to memory either way
        let numel = self.int(items[4], "storage size")?;
        if let Some(&i) = self.storage_by_key.get(&key) {
            let known = &self.storages[i];
            if known.dtype != dtype || known.numel != numel {
                return Err(format!(
                    "storage `{}` is declared twice, as {:?}[{}] and {:?}[{}]",
                    key.escape_debug(),
                    known.dtype,
                    known.numel,
                    dtype,
                    numel
                ));
            }
            return Ok(i);
        }
        self.storages.push(StorageDecl {
            key: key.clone(),
            dtype,
            numel,
        });
        self.storage_by_key.insert(key, self.storages.len() - 1);
        Ok(self.storages.len() - 1)
    }

    // ---------------------------------------------------------------- result
    fn dict_pairs(&self, v: Value) -> Option<&[(Value, Value)]> {
        match self.obj(v) {
            Some(Obj::Dict(pairs)) => Some(pairs),
            _ => None,
        }
    }

    fn state_dict_entries(&self, root: Value) -> Result<Vec<(String, TensorDecl)>, String> {
        let mut pairs = self
            .dict_pairs(root)
            .ok_or_else(|| format!("the checkpoint holds {}, not a state dict", self.kind(root)))?;
        // A training checkpoint wraps the weights: {"state_dict": {...}, "epoch": ...}.
        let wrapped = pairs
            .iter()
            .rev()
            .find(|(k, _)| matches!(self.obj(*k), Some(Obj::Str(s)) if s == "state_dict"))
            .and_then(|&(_, v)| self.dict_pairs(v));
        if let Some(inner) = wrapped {
            pairs = inner;
        }
        let mut tensors = BTreeMap::new();
        for &(k, v) in pairs {
            let name = self
                .string(k)
                .map_err(|_| format!("state dict key is {}, not a string", self.kind(k)))?;
            match self.obj(v) {
                Some(Obj::Tensor(t)) => {
                    tensors.insert(name.to_string(), t.clone());
                }
                _ => {
                    return Err(format!(
                        "entry `{}` is {}, not a tensor",
                        name.escape_debug(),
                        self.kind(v)
                    ))
                }
            }
        }
        Ok(tensors.into_iter().collect())
    }
}

/// The whitelist: the only globals a state dict needs, none of which is ever called for real.
fn allowed_global(module: &str, name: &str) -> Option<Global> {
    match (module, name) {
        ("collections", "OrderedDict") => Some(Global::OrderedDict),
        ("torch._utils", "_rebuild_tensor_v2") => Some(Global::RebuildTensorV2),
        ("torch._utils", "_rebuild_tensor") => Some(Global::RebuildTensor),
        ("torch._utils", "_rebuild_parameter") => Some(Global::RebuildParameter),
        ("torch" | "torch.cuda", _) if storage_dtype(name).is_some() => {
            storage_dtype(name).map(Global::StorageType)
        }
        ("torch", _) => torch_dtype(name).map(Global::DTypeObject),
        _ => None,
    }
}

fn storage_dtype(name: &str) -> Option<DType> {
    Some(match name {
        "FloatStorage" => DType::F32,
        "HalfStorage" => DType::F16,
        "BFloat16Storage" => DType::BF16,
        "DoubleStorage" => DType::F64,
        "LongStorage" => DType::I64,
        "IntStorage" => DType::I32,
        "ShortStorage" => DType::I16,
        "CharStorage" => DType::I8,
        "ByteStorage" | "UntypedStorage" => DType::U8,
        "BoolStorage" => DType::Bool,
        _ => return None,
    })
}

fn torch_dtype(name: &str) -> Option<DType> {
    Some(match name {
        "float32" | "float" => DType::F32,
        "float16" | "half" => DType::F16,
        "bfloat16" => DType::BF16,
        "float64" | "double" => DType::F64,
        "int64" | "long" => DType::I64,
        "int32" | "int" => DType::I32,
        "int16" | "short" => DType::I16,
        "int8" => DType::I8,
        "uint8" => DType::U8,
        "bool" => DType::Bool,
        _ => return None,
    })
}

#[cfg(test)]
mod pickle_tests {
    use super::*;

    fn unicode(s: &str) -> Vec<u8> {
        let mut v = vec![b'X'];
        v.extend_from_slice(&(s.len() as u32).to_le_bytes());
        v.extend_from_slice(s.as_bytes());
        v
    }

    /// OrderedDict {name: tensor(storage "0", FloatStorage[numel], offset, size, stride)}.
    fn one_tensor(name: &str, numel: u8, offset: u8, size: &[u8], stride: &[u8]) -> Vec<u8> {
        let mut p = b"\x80\x02ccollections\nOrderedDict\nq\x00)R".to_vec();
        p.extend(unicode(name));
        p.extend_from_slice(b"ctorch._utils\n_rebuild_tensor_v2\n((");
        p.extend(unicode("storage"));
        p.extend_from_slice(b"ctorch\nFloatStorage\n");
        p.extend(unicode("0"));
        p.extend(unicode("cpu"));
        p.extend_from_slice(&[b'K', numel, b't', b'Q', b'K', offset]);
        for seq in [size, stride] {
            p.push(b'(');
            for &d in seq {
                p.extend_from_slice(&[b'K', d]);
            }
            p.push(b't');
        }
        p.extend_from_slice(b"\x89h\x00)RtRs.");
        p
    }

    #[test]
    fn parses_a_hand_written_state_dict() {
        let sd = load_state_dict(&one_tensor("w", 12, 2, &[2, 3], &[1, 2])).unwrap();
        assert_eq!(
            sd.storages,
            vec![StorageDecl {
                key: "0".into(),
                dtype: DType::F32,
                numel: 12
            }]
        );
        assert_eq!(sd.tensors.len(), 1);
        assert_eq!(sd.tensors[0].0, "w");
        assert_eq!(
            sd.tensors[0].1.view,
            View {
                offset: 2,
                shape: vec![2, 3],
                stride: vec![1, 2]
            }
        );
    }

    #[test]
    fn forbidden_globals_are_named() {
        for (module, name) in [("posix", "system"), ("builtins", "eval"), ("torch", "load")] {
            let mut p = b"\x80\x02c".to_vec();
            p.extend_from_slice(format!("{module}\n{name}\n)R.").as_bytes());
            let err = load_state_dict(&p).unwrap_err();
            assert!(
                err.contains(&format!("forbidden global `{module}.{name}`")),
                "{err}"
            );
        }
    }

    #[test]
    fn storage_types_cannot_be_called_and_dicts_need_string_keys() {
        let err = load_state_dict(b"\x80\x02ctorch\nFloatStorage\n)R.").unwrap_err();
        assert!(err.contains("torch.FloatStorage"), "{err}");
        let err = load_state_dict(b"\x80\x02}K\x01K\x02s.").unwrap_err();
        assert!(err.contains("not a string"), "{err}");
    }

    #[test]
    fn every_truncation_is_a_clean_error() {
        let full = one_tensor("w", 12, 2, &[2, 3], &[1, 2]);
        for cut in 0..full.len() {
            assert!(load_state_dict(&full[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn deep_nesting_and_self_reference_are_harmless() {
        // 200k nested 1-tuples, then a list that contains itself: no recursion anywhere.
        let mut p = b"\x80\x02)".to_vec();
        p.extend(std::iter::repeat_n(0x85u8, 200_000));
        p.extend_from_slice(b"0]q\x01h\x01a.");
        let err = load_state_dict(&p).unwrap_err();
        assert!(err.contains("a list, not a state dict"), "{err}");
    }

    #[test]
    fn stack_memo_and_object_limits_are_enforced() {
        let small = PickleLimits {
            stack: 10,
            memo: 3,
            objects: 5,
        };
        // 11 values on the stack (depth counts open MARKs too).
        let mut p = b"\x80\x02".to_vec();
        p.extend([b'N'; 11]);
        p.push(b'.');
        let err = load_state_dict_with(&p, small).unwrap_err();
        assert!(
            err.contains("pickle stack deeper than the limit of 10"),
            "{err}"
        );
        let mut p = b"\x80\x02".to_vec();
        p.extend([b'('; 11]);
        let err = load_state_dict_with(&p, small).unwrap_err();
        assert!(
            err.contains("pickle stack deeper than the limit of 10"),
            "{err}"
        );
        // A fourth memo slot.
        let err = load_state_dict_with(b"\x80\x02N\x94\x94\x94\x94.", small).unwrap_err();
        assert!(
            err.contains("pickle memo larger than the limit of 3 entries"),
            "{err}"
        );
        // Overwriting a slot is not growth.
        assert!(
            !load_state_dict_with(b"\x80\x02Nq\x00q\x00q\x00q\x00q\x00.", small)
                .unwrap_err()
                .contains("memo")
        );
        // A sixth object (empty tuples popped right away: the stack stays shallow).
        let err = load_state_dict_with(b"\x80\x02)0)0)0)0)0)0}.", small).unwrap_err();
        assert!(
            err.contains("pickle creates more than the limit of 5 objects"),
            "{err}"
        );
        // The defaults.
        assert_eq!(
            PickleLimits::default(),
            PickleLimits {
                stack: 1 << 20,
                memo: 1 << 20,
                objects: 1 << 22
            }
        );
    }

    /// Fuzz-style regression: REDUCE on a memoized huge argument tuple must not copy it per
    /// call (that was quadratic: ~16 MB copied per 5-byte REDUCE).
    #[test]
    fn reduce_does_not_copy_large_argument_tuples() {
        let mut p = b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\nq\x00((".to_vec();
        p.extend(unicode("storage"));
        p.extend_from_slice(b"ctorch\nFloatStorage\n");
        p.extend(unicode("0"));
        p.extend(unicode("cpu"));
        p.extend_from_slice(b"K\x06tQK\x00(K\x02t(K\x01t");
        p.extend(std::iter::repeat_n(b'N', 500_000));
        p.extend_from_slice(b"tq\x01");
        for _ in 0..20_000 {
            p.extend_from_slice(b"h\x00h\x01R0");
        }
        p.extend_from_slice(b"}.");
        let start = std::time::Instant::now();
        let sd = load_state_dict(&p).unwrap();
        assert!(sd.tensors.is_empty());
        assert!(start.elapsed().as_secs() < 5, "{:?}", start.elapsed());
    }

    #[test]
    fn tensors_have_at_most_32_dims() {
        let ones = [1u8; 33];
        let err = load_state_dict(&one_tensor("w", 1, 0, &ones, &ones)).unwrap_err();
        assert!(
            err.contains("tensor size has 33 dims (at most 32)"),
            "{err}"
        );
        assert!(load_state_dict(&one_tensor("w", 1, 0, &ones[..32], &ones[..32])).is_ok());
    }

    #[test]
    fn marks_fence_the_stack() {
        // TUPLE1 right after MARK must not reach the value below the mark.
        let err = load_state_dict(b"\x80\x02K\x01(\x85.").unwrap_err();
        assert!(err.contains("needs 1 values"), "{err}");
    }
}
