-- Argo CD health of a gpumarket GpuOffer, from status.conditions and per-GPU health.
-- Argo CD runs this with the object in `obj` (gopher-lua, Lua 5.1); it must return {status, message}.
local hs = {}

local function condition(status, type)
  if status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == type then
      return c
    end
  end
  return nil
end

local status = obj.status
if status == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the first heartbeat of the supplier agent"
  return hs
end

local healthy = condition(status, "Healthy")
if healthy ~= nil and healthy.status == "False" then
  hs.status = "Degraded"
  hs.message = healthy.message or "GPUs unhealthy"
  return hs
end

local unhealthy = 0
local gpus = status.gpus or {}
for _, g in ipairs(gpus) do
  if g.health == "Unhealthy" then
    unhealthy = unhealthy + 1
  end
end
if unhealthy > 0 then
  hs.status = "Degraded"
  hs.message = unhealthy .. " of " .. #gpus .. " GPUs unhealthy"
  return hs
end

local available = condition(status, "Available")
if available == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the gpumarket controller to assess the offer"
elseif available.status == "True" then
  hs.status = "Healthy"
  hs.message = tostring(status.freeGpus or 0) .. " GPUs free"
else
  hs.status = "Degraded"
  hs.message = available.message or "Not available"
end
return hs
