"""The loops of a kernel's SASS (Triton's nvdisasm, which needs no GPU): what
scripts/triton-attention-sass.py and scripts/cuda-attention-sass.py print."""

import collections
import os
import re
import subprocess


def nvdisasm():
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")


def disassemble(cubin_path):
    return subprocess.run([nvdisasm(), "-c", cubin_path], check=True, capture_output=True, text=True).stdout


def functions(sass):
    """{mangled name: its SASS} of each function in nvdisasm's listing of a cubin."""
    parts = re.split(r"\n\s*\.section\s+\.text\.", sass)
    return {part.split(",", 1)[0]: part for part in parts[1:]}


def loops(sass):
    """(first address, last address, opcodes) of each loop (a backward branch) holding a matrix product."""
    lines = sass.splitlines()
    instructions, labels = [], {}
    for n, line in enumerate(lines):
        label = re.match(r"(\.L_x_\d+):", line)
        if label:
            labels[label.group(1)] = n
        found = re.match(r"\s+/\*([0-9a-f]+)\*/\s+(.*?);", line)
        if found:
            instructions.append((int(found.group(1), 16), found.group(2), n))
    address_at_line = {n: address for address, _, n in instructions}
    products = [address for address, text, _ in instructions if "MMA" in text.split()[0] or " HGMMA" in text
                or "HMMA" in text]
    found = []
    for address, text, _ in instructions:
        branch = re.search(r"BRA\s+`\((\.L_x_\d+)\)", text)
        if not branch or branch.group(1) not in labels:
            continue
        target = next(address_at_line[n] for n in range(labels[branch.group(1)], len(lines)) if n in address_at_line)
        if target < address and any(target <= p <= address for p in products):
            body = [re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0]
                    for a, t, _ in instructions if target <= a <= address]
            found.append((target, address, body))
    return found


def print_loops(sass):
    for first_address, last_address, body in loops(sass):
        counts = collections.Counter(body)
        products = counts.get("HGMMA", 0) + counts.get("HMMA", 0)
        common = ", ".join(f"{op} {n}" for op, n in counts.most_common(10))
        print(f"  loop {first_address:#x}-{last_address:#x}: {len(body)} instructions, {products} matrix "
              f"products; {common}")
